"""`edge agent run`: serve the store's models over HTTP (KServe v2, OpenAI, Prometheus)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from edge.web.limits import BODY_TIMEOUT_S, HEADER_TIMEOUT_S, MAX_CONNECTIONS, HttpLimits


def register(app: typer.Typer) -> None:
    """Add the `agent` commands to the CLI."""
    sub = typer.Typer(help="The device agent: serve installed models offline.", no_args_is_help=True)
    app.add_typer(sub, name="agent")

    @sub.command("run")
    def run(
        device_id: str = typer.Option(..., "--device-id", help="This device's id (letters, digits, . _ : -)."),
        data: Path = typer.Option(..., "--data", help="Data folder of the model store."),
        profile: str = typer.Option("auto", "--profile", help="Device profile name, or 'auto' to detect it."),
        http: str = typer.Option("127.0.0.1:8080", "--http", help="HOST:PORT to serve on (port 0 picks a free one)."),
        trusted_key: Optional[List[Path]] = typer.Option(
            None, "--trusted-key", help="Public key whose bundles are accepted (repeatable)."),
        revoked_key: Optional[List[str]] = typer.Option(
            None, "--revoked-key", help="Key id or public key file whose signatures are refused, installed models "
            "included (repeatable; adds to $EDGE_REVOKED_KEYS)."),
        threads: int = typer.Option(0, "--threads", help="ONNX Runtime threads per model (0: the profile's)."),
        max_body_mb: int = typer.Option(32, "--max-body-mb", help="Largest request body in MiB."),
        max_batch: int = typer.Option(32, "--max-batch", help="Largest encoder batch."),
        batch_wait_ms: float = typer.Option(2.0, "--batch-wait-ms", help="Longest wait for an encoder batch to fill."),
        llm_slots: int = typer.Option(4, "--llm-slots", help="Generations an LLM advances together."),
        queue: int = typer.Option(64, "--queue", help="Requests waiting per model before 429."),
        max_connections: int = typer.Option(
            MAX_CONNECTIONS, "--max-connections", help="Open HTTP connections before new requests get 503."),
        header_timeout: float = typer.Option(
            HEADER_TIMEOUT_S, "--header-timeout", help="Seconds a client gets to send a request's headers."),
        body_timeout: float = typer.Option(
            BODY_TIMEOUT_S, "--body-timeout", help="Seconds a client gets to send a request body (408 after), "
            "plus one per KiB received."),
        broker: Optional[str] = typer.Option(
            None, "--broker", help="Fleet broker URL, mqtt://[user[:pass]@]HOST:PORT or mqtts://... (none: offline)."),
        fleet: str = typer.Option("default", "--fleet", help="Fleet id in the topic tree."),
        topic_root: str = typer.Option("edge", "--topic-root", help="Root of the topic tree."),
        ca_file: Optional[Path] = typer.Option(None, "--ca-file", help="CA bundle for mqtts:// (default: system CAs)."),
        cert_file: Optional[Path] = typer.Option(None, "--cert-file", help="Client certificate for mqtts://."),
        key_file: Optional[Path] = typer.Option(None, "--key-file", help="Client certificate key for mqtts://."),
        telemetry_interval: float = typer.Option(5.0, "--telemetry-interval", help="Seconds between telemetry messages."),
        download_rate_kb: float = typer.Option(0, "--download-rate-kb", help="Bundle download cap in KiB/s (0: none)."),
    ) -> int:
        """Serve the store's active models until SIGTERM; runs without network."""
        from edge.agent.runner import Agent, AgentOptions, parse_http
        from edge.agent.server.context import ServerConfig
        from edge.errors import ConfigError

        host, port = parse_http(http)
        try:
            server = ServerConfig(
                max_body_bytes=max_body_mb * 1024 * 1024, infer_queue=queue, llm_max_queue=queue,
                batch_max_size=max_batch, batch_max_wait_s=batch_wait_ms / 1000, llm_max_active=llm_slots,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        options = AgentOptions(device_id=device_id, data_dir=data, host=host, port=port, profile=profile,
                               trusted_keys=tuple(trusted_key or ()), revoked_keys=tuple(revoked_key or ()),
                               threads=threads or None, server=server,
                               http=HttpLimits(header_timeout_s=header_timeout, body_timeout_s=body_timeout,
                                               max_connections=max_connections))
        connector = None
        if broker:
            from edge import settings
            from edge.agent.fleet_link import FleetLink, FleetOptions
            from edge.protocol.topics import Topics, check_id
            from edge.transport.url import TlsOptions

            check_id(device_id)
            tls = TlsOptions(ca_file=ca_file, cert_file=cert_file, key_file=key_file) \
                if (ca_file or cert_file or key_file) else None
            connector = FleetLink(FleetOptions(
                broker_url=broker, topics=Topics(fleet=fleet, root=topic_root), tls=tls,
                password=settings.broker_password(), telemetry_interval=telemetry_interval,
                download_rate=download_rate_kb * 1024 if download_rate_kb > 0 else None,
            ))
        agent = Agent(options, connector=connector)

        def listening(url: str) -> None:
            # Always printed (not a log line) so scripts and tests can find a port picked with :0.
            print(f"edge agent {device_id}: serving on {url}", file=sys.stderr, flush=True)

        return agent.serve(on_listening=listening)
