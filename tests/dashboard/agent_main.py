"""Run one real device agent connected to a fleet: the store, the inference server and FleetLink.

`edge agent run` has no broker option yet, so the dashboard tests start agents through this
module, which wires the same parts that option will (:class:`edge.agent.runner.Agent` with a
:class:`edge.agent.fleet_link.FleetLink` connector)::

    python -m tests.dashboard.agent_main --device-id d1 --data DIR --broker mqtt://127.0.0.1:1883 \
        --trusted-key test.pub [--telemetry-interval 2] [--profile generic-cpu]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from edge.agent.fleet_link import FleetLink, FleetOptions
from edge.agent.runner import Agent, AgentOptions
from edge.protocol.topics import Topics


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM (a clean goodbye) or SIGKILL (the broker publishes the last will)."""
    p = argparse.ArgumentParser()
    p.add_argument("--device-id", required=True)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--broker", required=True)
    p.add_argument("--trusted-key", required=True, type=Path)
    p.add_argument("--fleet", default="default")
    p.add_argument("--telemetry-interval", type=float, default=2.0)
    p.add_argument("--profile", default="generic-cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    link = FleetLink(FleetOptions(broker_url=args.broker, topics=Topics(fleet=args.fleet),
                                  telemetry_interval=args.telemetry_interval))
    options = AgentOptions(device_id=args.device_id, data_dir=args.data, host="127.0.0.1", port=0,
                           profile=args.profile, trusted_keys=(args.trusted_key,))
    agent = Agent(options, connector=link)
    return agent.serve(on_listening=lambda url: print(f"agent {args.device_id} serving on {url}", file=sys.stderr, flush=True))


if __name__ == "__main__":
    sys.exit(main())
