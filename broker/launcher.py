"""Start and stop a local Mosquitto from the configs in ``broker/``.

One :class:`MosquittoBroker` owns one ``mosquitto`` process. ``start()`` renders
``broker/dev.conf`` into a run directory (changing only the listener, the packet size limit,
persistence and the user), starts ``mosquitto -c <run dir>/mosquitto.conf`` with its log in
``<run dir>/mosquitto.log``, and returns once the broker answers a real MQTT CONNECT with a
CONNACK. ``stop()`` sends SIGTERM, then SIGKILL after a timeout, and reaps the process::

    with MosquittoBroker() as broker:          # a free port on 127.0.0.1
        print(broker.url)                      # mqtt://127.0.0.1:45123
        broker.restart()                       # same port, new process

Lifecycle: unopened -> running -> stopped; ``start()`` again after ``stop()`` is allowed, and
``restart()`` keeps the port. A temporary run directory made by ``start()`` is removed by
``stop()``; a run directory given by the caller is kept.

The secure broker (:mod:`broker.security`) has only a TLS listener: pass
``tls_context=`` and the readiness probe handshakes TLS first; its anonymous CONNECT is
refused, and a refusing CONNACK counts as up. ``reload()`` (SIGHUP) re-reads the password
and ACL files.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType

from pipeline.codec import MAX_PACKET_BYTES
from pipeline.errors import BrokerError

logger = logging.getLogger(__name__)

BROKER_DIR = Path(__file__).resolve().parent
"""The Mosquitto configs live beside this launcher (package data of ``broker``)."""

DEV_CONFIG = BROKER_DIR / "dev.conf"
"""The development config that :class:`MosquittoBroker` renders by default."""

DEFAULT_MAX_PACKET_SIZE = MAX_PACKET_BYTES
"""16 MiB: room for a several-MB activation tensor plus its header. Defined once in
:mod:`pipeline.codec`, where the nodes' default payload limit is set below it."""

CONFIG_NAME = "mosquitto.conf"
LOG_NAME = "mosquitto.log"
FALLBACK_BINARY = Path("/usr/sbin/mosquitto")
INSTALL_HINT = (
    "run `make setup` (it installs Mosquitto from Debian) or `sudo apt-get install mosquitto`"
)

# Keys that render_config() sets itself; the template's own lines for them are dropped.
_OVERRIDDEN_KEYS = ("max_packet_size", "persistence", "persistence_location", "user")
_ADDRESS_IN_USE = "Address already in use"
_FREE_PORT_ATTEMPTS = 5
_LOG_TAIL_LINES = 30


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that is free right now (the OS picks it).

    Another process may take it before it is used; :meth:`MosquittoBroker.start` retries with
    a new port when that happens.
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _connect_packet(client_id: str) -> bytes:
    """An MQTT 3.1.1 CONNECT packet: clean session, 10 s keep-alive, no credentials."""
    cid = client_id.encode("ascii")
    variable_header = b"\x00\x04MQTT" + bytes([4, 0x02]) + (10).to_bytes(2, "big")
    payload = len(cid).to_bytes(2, "big") + cid
    remaining = len(variable_header) + len(payload)
    if remaining >= 128:  # a one-byte remaining length keeps this encoder trivial
        raise ValueError("client id too long for the probe packet")
    return bytes([0x10, remaining]) + variable_header + payload


def mqtt_handshake(
    host: str, port: int, timeout: float = 1.0, ssl_context: ssl.SSLContext | None = None
) -> bool:
    """Send one MQTT CONNECT to ``host:port`` and report whether a CONNACK came back.

    Any CONNACK counts, even one that refuses the connection (a broker that requires a
    password is still up). With ``ssl_context`` the CONNECT goes over TLS (a failed TLS
    handshake, e.g. a plain listener or an untrusted certificate, returns False). Connection
    errors and timeouts return False; nothing is raised.
    """
    packet = _connect_packet(f"edgeprune-probe-{uuid.uuid4().hex[:8]}")
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            sock = raw
            if ssl_context is not None:
                name = host if ssl_context.check_hostname else None
                sock = ssl_context.wrap_socket(raw, server_hostname=name)
            sock.sendall(packet)
            reply = b""
            while len(reply) < 4:
                chunk = sock.recv(4 - len(reply))
                if not chunk:
                    return False
                reply += chunk
            if reply[0] != 0x20 or reply[1] != 0x02:
                return False
            sock.sendall(b"\xe0\x00")  # DISCONNECT, so the broker logs a clean goodbye
            return True
    except OSError:
        return False


def listening_on(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds a listening TCP socket on ``port``.

    Reads ``/proc`` (Linux); returns None where that is not possible. Used so that a
    CONNACK from some other broker that happens to hold the port is not mistaken for ours.
    """
    proc_dir = Path("/proc") / str(pid)
    try:
        fds = os.listdir(proc_dir / "fd")
    except OSError:
        return None
    inodes: set[str] = set()
    for fd in fds:
        try:
            target = os.readlink(proc_dir / "fd" / fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    for table in ("tcp", "tcp6"):
        try:
            rows = (proc_dir / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            # sl local_address rem_address st ... inode (index 9); state 0A is LISTEN
            fields = row.split()
            if (
                len(fields) > 9
                and fields[3] == "0A"
                and int(fields[1].rsplit(":", 1)[1], 16) == port
                and fields[9] in inodes
            ):
                return True
    return False


def wait_for_mqtt(
    host: str, port: int, timeout: float = 10.0, ssl_context: ssl.SSLContext | None = None
) -> None:
    """Poll ``host:port`` with MQTT handshakes (over TLS with ``ssl_context``) until one
    succeeds or ``timeout`` passes; a refusing CONNACK counts as up.

    Raises:
        BrokerError: no CONNACK within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    interval = 0.01
    while True:
        remaining = deadline - time.monotonic()
        if mqtt_handshake(host, port, max(0.05, min(1.0, remaining)), ssl_context):
            return
        if time.monotonic() + interval > deadline:
            raise BrokerError(f"no MQTT broker answered on {host}:{port} within {timeout:g} s")
        time.sleep(interval)
        interval = min(interval * 2, 0.1)


def render_config(
    template: str,
    *,
    host: str,
    port: int,
    max_packet_size: int,
    persistence: bool,
    run_dir: Path,
    user: str | None = None,
) -> str:
    """Return ``template`` (the text of a Mosquitto config) adapted to one run.

    The template's single ``listener`` line is replaced in place (so listener-scoped options
    after it stay attached to it); its lines for ``max_packet_size``, ``persistence``,
    ``persistence_location`` and ``user`` are dropped and set again in a block at the end.
    ``run_dir`` should be absolute: mosquitto resolves a relative one against its own cwd.
    ``user`` defaults to the user running this process, so a broker started as root keeps
    write access to its run directory.

    Raises:
        BrokerError: the template does not have exactly one ``listener`` line.
    """
    if user is None:
        user = pwd.getpwuid(os.geteuid()).pw_name
    out: list[str] = []
    listeners = 0
    for line in template.splitlines():
        words = line.split()
        key = words[0] if words and not words[0].startswith("#") else ""
        if key == "listener":
            listeners += 1
            out.append(f"listener {port} {host}")
        elif key not in _OVERRIDDEN_KEYS:
            out.append(line)
    if listeners != 1:
        raise BrokerError(f"a broker config template needs exactly one listener, found {listeners}")
    out += [
        "",
        "# ---- set by broker.launcher for this run ----",
        f"max_packet_size {max_packet_size}",
        f"persistence {'true' if persistence else 'false'}",
    ]
    if persistence:
        # Mosquitto joins location and file name as strings: the trailing slash matters.
        out.append(f"persistence_location {run_dir}/")
    out.append(f"user {user}")
    return "\n".join(out) + "\n"


def find_mosquitto(binary: str | Path | None = None) -> Path:
    """Return the path of the ``mosquitto`` executable.

    With ``binary`` given, that path (or name on PATH) must be executable; otherwise PATH is
    searched, then ``/usr/sbin`` (not on a normal user's PATH on Debian).

    Raises:
        BrokerError: no executable found; the message says how to install Mosquitto.
    """
    if binary is not None:
        found = shutil.which(str(binary))
        if found is None:
            raise BrokerError(
                f"Mosquitto binary {binary} is not an executable file; {INSTALL_HINT}"
            )
        return Path(found)
    found = shutil.which("mosquitto")
    if found is not None:
        return Path(found)
    if os.access(FALLBACK_BINARY, os.X_OK):
        return FALLBACK_BINARY
    raise BrokerError(f"mosquitto is not installed (not on PATH, not in /usr/sbin); {INSTALL_HINT}")


class _AddressInUseError(BrokerError):
    """The listener port was taken; start() may retry on another port."""


class MosquittoBroker:
    """One local ``mosquitto`` process, started from a rendered ``broker/`` config.

    Args:
        port: TCP port to listen on; None picks a free one at ``start()``.
        host: address to listen on (default loopback only).
        run_dir: where the config, log and (with ``persistence``) the database go; None makes
            a temporary directory at ``start()`` and removes it at ``stop()``.
        max_packet_size: largest MQTT packet, in bytes, a client may send.
        persistence: keep retained messages and sessions in ``run_dir`` across restarts.
        binary: the ``mosquitto`` executable; None searches PATH and ``/usr/sbin``.
        template: the config to render; default ``broker/dev.conf``.
        tls_context: set when the template's listener speaks TLS (``broker/secure.conf``, see
            :mod:`broker.security`): the readiness probe then handshakes TLS with it.
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        run_dir: Path | None = None,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        persistence: bool = False,
        *,
        binary: str | Path | None = None,
        template: Path = DEV_CONFIG,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        if port is not None and not 0 < port < 65536:
            raise BrokerError(f"port must be in 1..65535 (or None for a free one), got {port}")
        if max_packet_size < 64:
            raise BrokerError(f"max_packet_size must be at least 64 bytes, got {max_packet_size}")
        self._host = host
        self._port = port
        self._fixed_port = port is not None
        self._given_run_dir = Path(run_dir).resolve() if run_dir is not None else None
        self._run_dir: Path | None = self._given_run_dir
        self._max_packet_size = max_packet_size
        self._persistence = persistence
        self._binary = binary
        self._template = Path(template)
        self._tls_context = tls_context
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_once = False

    # ---- properties -------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address the broker listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The listener port (known once started, kept across stop and restart)."""
        if self._port is None:
            raise BrokerError("the broker has no port yet: call start() first")
        return self._port

    @property
    def url(self) -> str:
        """``mqtt://host:port`` (``mqtts://`` for TLS), with an IPv6 host in brackets."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{'mqtts' if self._tls_context else 'mqtt'}://{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The process id while running, else None."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the mosquitto process has been started and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def max_packet_size(self) -> int:
        """The configured largest MQTT packet a client may send, in bytes."""
        return self._max_packet_size

    @property
    def run_dir(self) -> Path:
        """The directory holding the rendered config and the log."""
        if self._run_dir is None:
            raise BrokerError("the broker has no run directory yet: call start() first")
        return self._run_dir

    @property
    def config_path(self) -> Path:
        """The rendered config, ``<run_dir>/mosquitto.conf``."""
        return self.run_dir / CONFIG_NAME

    @property
    def log_path(self) -> Path:
        """The broker's log (its stdout and stderr), ``<run_dir>/mosquitto.log``."""
        return self.run_dir / LOG_NAME

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        port = self._port if self._port is not None else "?"
        return f"MosquittoBroker({self._host}:{port}, {state}, pid={self.pid})"

    # ---- lifecycle --------------------------------------------------------------------

    def render(self) -> str:
        """The config text this broker runs with (a free port is picked if none is set yet)."""
        if self._port is None:
            self._port = free_port(self._host)
        run_dir = self._run_dir or Path("<run-dir>")  # only --print-config renders without one
        try:
            template = self._template.read_text(encoding="utf-8")
        except OSError as exc:
            raise BrokerError(
                f"cannot read the broker config template {self._template}: {exc}"
            ) from exc
        return render_config(
            template,
            host=self._host,
            port=self._port,
            max_packet_size=self._max_packet_size,
            persistence=self._persistence,
            run_dir=run_dir,
        )

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        """Start mosquitto and return once it answers MQTT; returns self.

        With no fixed port, a port taken between picking and binding is retried with a new
        one (up to 5 times). After a stop, the port of the last run is reused and an
        ``Address already in use`` is retried until ``timeout``.

        Raises:
            BrokerError: already running, binary missing, the process exited (the message
                carries the tail of its log), or no CONNACK within ``timeout``.
        """
        if self.running:
            raise BrokerError(f"{self!r} is already running")
        binary = find_mosquitto(self._binary)
        if self._run_dir is None:
            self._run_dir = Path(tempfile.mkdtemp(prefix="edgeprune-mosquitto-"))
        else:
            self._run_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        fresh_ports = 0
        try:
            while True:
                if self._port is None:
                    self._port = free_port(self._host)
                    fresh_ports += 1
                try:
                    proc = self._launch(binary, deadline)
                    break
                except _AddressInUseError:
                    if self._started_once:
                        # Our own port from the previous run: wait for it, up to the deadline.
                        if time.monotonic() < deadline:
                            time.sleep(0.05)
                            continue
                    elif not self._fixed_port and fresh_ports < _FREE_PORT_ATTEMPTS:
                        logger.debug(
                            "port %s was taken before mosquitto bound it; retrying", self._port
                        )
                        self._port = None
                        continue
                    raise
        except BaseException:  # also Ctrl-C while waiting: leave no process behind
            self._stop_process(timeout=2.0)
            self._remove_temp_run_dir()
            raise
        self._started_once = True
        logger.info("mosquitto (pid %d) listening on %s", proc.pid, self.url)
        return self

    def _launch(self, binary: Path, deadline: float) -> subprocess.Popen[bytes]:
        """Render the config, spawn mosquitto once and wait until it answers MQTT."""
        run_dir = self.run_dir
        self.config_path.write_text(self.render(), encoding="utf-8")
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        logger.debug("starting %s -c %s", binary, self.config_path)
        with self.log_path.open("ab") as log:
            try:
                proc = subprocess.Popen(
                    [str(binary), "-c", str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=run_dir,
                    start_new_session=True,  # Ctrl-C in a terminal reaches us, not mosquitto
                )
            except OSError as exc:
                raise BrokerError(f"cannot run {binary}: {exc}; {INSTALL_HINT}") from exc
        self._proc = proc
        interval = 0.005
        while True:
            code = proc.poll()
            if code is not None:
                tail = self.log_tail(log_start)
                self._proc = None
                error = _AddressInUseError if _ADDRESS_IN_USE in tail else BrokerError
                raise error(
                    f"mosquitto exited with code {code} while starting on {self._host}:{self._port}"
                    f" (config {self.config_path}); log:\n{tail}"
                )
            remaining = deadline - time.monotonic()
            # Check that the listener is ours first: if another broker holds the port, its
            # CONNACK must not count (our process is about to exit with "Address in use").
            if listening_on(proc.pid, self.port) is not False and mqtt_handshake(
                self._host, self.port, max(0.05, min(1.0, remaining)), self._tls_context
            ):
                return proc
            if time.monotonic() >= deadline:
                self._kill(proc, timeout=2.0)
                self._proc = None
                raise BrokerError(
                    f"mosquitto did not answer MQTT on {self._host}:{self._port} in time;"
                    f" log:\n{self.log_tail(log_start)}"
                )
            time.sleep(interval)
            interval = min(interval * 2, 0.05)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``timeout``) and reap it.

        Idempotent. Removes the run directory if ``start()`` made it as a temporary one.
        """
        self._stop_process(timeout)
        self._remove_temp_run_dir()

    def restart(self, timeout: float = 10.0) -> MosquittoBroker:
        """Stop and start again on the same port; retained messages survive only with
        ``persistence=True``. Returns self.

        Raises:
            BrokerError: never started, or the new process does not come up.
        """
        if self._port is None:
            raise BrokerError("restart() needs a broker that has been started")
        self._stop_process(timeout=5.0)
        return self.start(timeout=timeout)

    def reload(self) -> None:
        """Make mosquitto re-read its password and ACL files (SIGHUP), e.g. after a re-plan
        regenerated the ACL. Listeners and limits are not reloaded: use ``restart()``.

        Raises:
            BrokerError: the broker is not running.
        """
        if self._proc is None or not self.running:
            raise BrokerError(f"{self!r} is not running: nothing to reload")
        self._proc.send_signal(signal.SIGHUP)

    def _stop_process(self, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        code = self._kill(proc, timeout)
        logger.info(
            "mosquitto (pid %d) on port %s stopped (exit code %s)", proc.pid, self._port, code
        )

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes], timeout: float) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL and wait; returns the exit code."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "mosquitto (pid %d) ignored SIGTERM for %g s; killing it", proc.pid, timeout
                )
                proc.kill()
        return proc.wait()

    def _remove_temp_run_dir(self) -> None:
        if self._given_run_dir is None and self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None

    def log_tail(self, offset: int = 0) -> str:
        """The last lines the broker wrote to its log since byte ``offset``."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            return "(no log)"
        lines = text.strip().splitlines()[-_LOG_TAIL_LINES:]
        return "\n".join("    " + line for line in lines) if lines else "    (empty log)"

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
