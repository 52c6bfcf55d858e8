"""The one place that talks to the MQTT library (paho), plus the embedded broker.

* :mod:`.mqtt`: :class:`MqttClient`, with its own reconnect loop, re-subscription and acks.
* :mod:`.url`: ``mqtt://`` / ``mqtts://`` URLs and :class:`TlsOptions`.
* :mod:`.names`: topic names, filters, shared subscriptions and client ids, checked up front.
* :mod:`.handles`: acknowledgements tracked per message id; :mod:`.backoff`: capped, jittered delays.
* :mod:`.acks`: acknowledgements of received messages given once the application stored them.
* :mod:`.errors`: every paho return and reason code mapped to our :class:`~edge.errors.TransportError` tree.
* :mod:`.embedded_broker`: an amqtt broker in a thread, the zero-setup default of `edge fleet serve`.
"""

from edge.transport.acks import Ack
from edge.transport.backoff import Backoff
from edge.transport.handles import PublishHandle, SubscribeHandle
from edge.transport.mqtt import ConnectionInfo, MqttClient
from edge.transport.url import BrokerUrl, TlsOptions, parse_broker_url

__all__ = [
    "Ack", "Backoff", "BrokerUrl", "ConnectionInfo", "MqttClient", "PublishHandle", "SubscribeHandle",
    "TlsOptions", "parse_broker_url",
]  # fmt: skip
