"""`edgeprune broker`: run a local Mosquitto in the foreground until Ctrl-C or SIGTERM.

``--secure`` runs ``broker/secure.conf`` instead of ``dev.conf``: passwords, an ACL that ties
every camera and node to its own id on one pipe, and a TLS listener, all made by
:mod:`broker.security` in the run directory.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from broker.launcher import DEFAULT_MAX_PACKET_SIZE, DEV_CONFIG, MosquittoBroker
from broker.security import (
    DEFAULT_ACL_PIPE,
    DEFAULT_SERVER_NAMES,
    DEFAULT_USERS,
    SECURE_PORT,
    SecureSetup,
    parse_placements,
    prepare_secure_broker,
)
from pipeline.errors import BrokerError, ConfigError

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``broker`` subcommand to the CLI."""
    parser = sub.add_parser(
        "broker",
        help="run a local Mosquitto (development or --secure config) in the foreground",
        description=(
            f"Start Mosquitto from {DEV_CONFIG.name} (rendered into a run directory with the "
            "chosen port and limits), wait until it answers MQTT, and keep it running until "
            "Ctrl-C or SIGTERM. Anonymous and unencrypted: for one machine or a trusted LAN. "
            "With --secure: secure.conf, one password per user, an ACL that lets each camera "
            "and node write only under its own id, and TLS only, "
            "with a local CA; the credentials stay in the run directory (mode 0600)."
        ),
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"TCP port to listen on; 0 picks a free one (default 1883, {SECURE_PORT} with "
        "--secure)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1, loopback only)",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="directory for the rendered config, the log and the database; "
        "default a temporary directory removed on exit (with --secure: runs/secure-broker, "
        "kept, so passwords and certificates survive a restart)",
    )
    parser.add_argument(
        "--max-packet-size",
        type=int,
        default=DEFAULT_MAX_PACKET_SIZE,
        metavar="BYTES",
        help=f"largest MQTT packet a client may send (default {DEFAULT_MAX_PACKET_SIZE})",
    )
    parser.add_argument(
        "--persistence",
        action="store_true",
        help="keep retained messages in the run directory across restarts",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the rendered config and exit without starting the broker (with "
        "--secure it also creates or updates the run directory: credentials, env files, "
        "certificates, ACL)",
    )
    sec = parser.add_argument_group("secure broker (--secure)")
    sec.add_argument(
        "--secure",
        action="store_true",
        help="passwords, ACL and TLS (broker/secure.conf); no anonymous access",
    )
    sec.add_argument(
        "--users",
        default=",".join(DEFAULT_USERS),
        help="comma-separated users: camera-<camera id>, node-<node id>, controller, "
        "observer[-x]; each camera and node may write only under its own id "
        "(default %(default)s)",
    )
    sec.add_argument(
        "--placement",
        default=None,
        metavar="NODE:STAGE,...",
        help="restrict each node to its stage (reads stage i, writes stage i+1, or results "
        "and exits for the highest stage); default: nodes may read every stage and write "
        "stages 1 and up, results and exits (a re-plan may move them), never a camera's "
        "stage/0/<camera>",
    )
    sec.add_argument(
        "--acl-pipe",
        default=DEFAULT_ACL_PIPE,
        help="the one pipeline the users may use (default %(default)s, as --pipe's default; "
        "'+': any pipe, so a node could also write other pipes' results)",
    )
    sec.add_argument(
        "--tls-names",
        default="",
        help="extra host names or addresses for the server certificate, comma-separated "
        f"(always: {', '.join(DEFAULT_SERVER_NAMES)})",
    )
    sec.add_argument(
        "--client-certs",
        action="store_true",
        help="also make a client certificate per user and require one on connect",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the broker until SIGINT or SIGTERM; returns 0 on a clean stop.

    Raises:
        ConfigError: a bad port or packet size.
        BrokerError: mosquitto cannot start, or exits on its own while running.
    """
    port = args.port if args.port is not None else (SECURE_PORT if args.secure else 1883)
    if not 0 <= port < 65536:
        raise ConfigError(f"--port must be in 0..65535, got {port}")
    if args.max_packet_size < 64:
        raise ConfigError(
            f"--max-packet-size must be at least 64 bytes, got {args.max_packet_size}"
        )
    setup: SecureSetup | None = None
    if args.secure:
        run_dir = args.run_dir or Path("runs") / "secure-broker"
        names = [
            *DEFAULT_SERVER_NAMES,
            *(n.strip() for n in args.tls_names.split(",") if n.strip()),
        ]
        if args.host not in ("0.0.0.0", "::"):
            names.append(args.host)
        setup = prepare_secure_broker(
            run_dir,
            args.users,
            pipe=args.acl_pipe,
            placements=parse_placements(args.placement) if args.placement else None,
            server_names=names,
            client_certs=args.client_certs,
        )
        broker = MosquittoBroker(
            port=port or None,
            host=args.host,
            run_dir=setup.run_dir,
            max_packet_size=args.max_packet_size,
            persistence=args.persistence,
            template=setup.config_template,
            tls_context=setup.probe_context(),
        )
    else:
        broker = MosquittoBroker(
            port=port or None,
            host=args.host,
            run_dir=args.run_dir,
            max_packet_size=args.max_packet_size,
            persistence=args.persistence,
        )
    if args.print_config:
        text = broker.render()  # picks the port, so the env files can name it
        if setup is not None:  # the run directory is ready to use without this process
            setup.write_env_files(_client_host(broker.host), broker.port)
        sys.stdout.write(text)
        return 0

    stop_requested = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        stop_requested.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        broker.start()
        try:
            print(
                f"Mosquitto listening on {broker.url} "
                f"(config: {broker.config_path}, log: {broker.log_path})",
                flush=True,
            )
            if setup is None:
                print(
                    f"  watch the pipeline: mosquitto_sub -h {broker.host} -p {broker.port} "
                    "-v -t 'edgeprune/#'",
                    flush=True,
                )
            else:
                _print_credentials(setup, broker)
            print("  stop with Ctrl-C", flush=True)
            # Wake up on a signal at once; otherwise check every half second that
            # mosquitto is still alive.
            while not stop_requested.wait(0.5):
                if not broker.running:
                    raise BrokerError(
                        f"mosquitto on {broker.url} exited on its own; log:\n{broker.log_tail()}"
                    )
            logger.info("received %s, stopping mosquitto", signal.Signals(received[0]).name)
        finally:
            broker.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _print_credentials(setup: SecureSetup, broker: MosquittoBroker) -> None:
    """Write the per-user env files and say how to use them (never print a password)."""
    host = _client_host(broker.host)
    files = setup.write_env_files(host, broker.port)
    observer = next((u.name for u in setup.users if u.role == "observer"), None)
    lines = [
        f"  users: {', '.join(files)}; passwords in {setup.credentials_file} (mode 0600)",
        f"  CA certificate for clients: {setup.ca_cert}",
        f"  one env file per user (mode 0600): {setup.env_dir}/<user>.env, e.g.",
        f"    set -a; . {files[next(iter(files))]}; set +a   # then any edgeprune command",
        "  it exports EDGEPRUNE_MQTT_HOST, _PORT, _USERNAME, _PASSWORD and _TLS_CA"
        + (" (+ _TLS_CERT, _TLS_KEY)" if setup.client_certs else ""),
    ]
    if observer is not None:
        certs = ""
        if setup.client_certs:
            certs = f"--cert {setup.cert_dir / observer}.crt --key {setup.cert_dir / observer}.key "
        lines.append(
            f"  watch the pipeline: (set -a; . {files[observer]}; mosquitto_sub -h {host} "
            f"-p {broker.port} --cafile {setup.ca_cert} {certs}-u {observer} "
            "-P \"$EDGEPRUNE_MQTT_PASSWORD\" -v -t 'edgeprune/#')"
        )
    print("\n".join(lines), flush=True)


def _client_host(listen: str) -> str:
    """The address a client on this machine dials for a broker listening on ``listen``."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen, listen)
