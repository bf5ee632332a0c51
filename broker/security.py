"""Credentials, ACL and certificates for the secure broker (``edgeprune broker --secure``).

:func:`prepare_secure_broker` fills a run directory with everything ``broker/secure.conf``
needs, and writes ``<run dir>/secure.conf``, a complete Mosquitto config::

    <run dir>/passwd               hashed passwords (mosquitto_passwd -U), 0600
    <run dir>/acl                  per-user ACL, regenerated on every call
    <run dir>/certs/ca.{crt,key}   a local CA (kept across calls)
    <run dir>/certs/server.{crt,key}  signed by it; SAN 127.0.0.1, localhost, broker, ...
    <run dir>/certs/<user>.{crt,key}  client certificates (only with client_certs=True)
    <run dir>/credentials.json     every user's role and password, 0600
    <run dir>/credentials/<user>.env  EDGEPRUNE_MQTT_* for one user, 0600 (write_env_files)

User names carry their role and identity: ``camera-<camera id>``, ``node-<node id>``,
``controller``, ``observer`` (or ``observer-<x>``); :func:`render_acl` ties each writer to its
identity. Passwords of users already in
``credentials.json`` are kept, so a restart does not break deployed devices. The tools are the
``openssl`` and ``mosquitto_passwd`` command lines; their failures become :class:`BrokerError`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import ssl
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from broker.launcher import BROKER_DIR
from bus.connection import MqttSettings
from bus.topics import AclTopics, check_name
from pipeline.errors import BrokerError, ConfigError

SECURE_TEMPLATE = BROKER_DIR / "secure.conf"
"""The secure config template; :func:`prepare_secure_broker` fills in its ``@NAME@`` tokens."""

SECURE_PORT = 8883
DEFAULT_USERS = ("camera-cam0", "node-n0", "node-n1", "controller", "observer")
DEFAULT_ACL_PIPE = "default"
"""The pipe the ACL allows unless told otherwise (``--acl-pipe``); ``+`` allows any pipe."""
DEFAULT_SERVER_NAMES = ("127.0.0.1", "localhost", "broker")
"""Names in the server certificate: loopback, and the broker's Compose service name."""

ROLES = ("camera", "node", "controller", "observer")
CERT_DAYS = 825  # the longest validity some TLS clients accept for a leaf certificate
_MOSQUITTO_PASSWD = ("mosquitto_passwd", "/usr/bin/mosquitto_passwd")


@dataclass(frozen=True)
class BrokerUser:
    """One MQTT account. ``node`` is the node id of a ``node-<id>`` user, ``camera`` the camera
    id of a ``camera-<id>`` user; None otherwise."""

    name: str
    role: str
    node: str | None = None
    camera: str | None = None

    @classmethod
    def parse(cls, name: str) -> BrokerUser:
        """``camera-<id>``, ``node-<id>``, ``controller`` or ``observer[-x]``.

        Raises:
            ConfigError: an unknown role, a camera without its id, or a name that cannot be a
                topic level.
        """
        check_name("user", name)
        if name.startswith("node-") and len(name) > len("node-"):
            return cls(name, "node", node=name[len("node-") :])
        if name.startswith("camera-") and len(name) > len("camera-"):
            return cls(name, "camera", camera=name[len("camera-") :])
        if name == "camera":
            raise ConfigError(
                "user 'camera': every camera gets its own user, camera-<camera id> "
                "(e.g. camera-cam0), and may publish only that camera's images"
            )
        if name == "observer" or name.startswith("observer-"):
            return cls(name, "observer")
        if name == "controller":
            return cls(name, "controller")
        raise ConfigError(
            f"user {name!r}: names are camera-<camera id>, node-<node id>, controller or "
            "observer[-x]"
        )


def account_of(username: str | None) -> BrokerUser | None:
    """The edgeprune account a user name stands for; None for a name of another form (a
    broker whose users and ACL the operator made by hand)."""
    if not username:
        return None
    try:
        return BrokerUser.parse(username)
    except ConfigError:
        return None


def node_id_for(username: str | None, node_id: str | None) -> str:
    """The node id a node runs as: ``node_id``, else the ``<id>`` of a ``node-<id>`` user.

    Raises:
        ConfigError: no node id at all, or an edgeprune user that may not publish as this
            node (the secure broker would drop its every message silently).
    """
    user = account_of(username)
    if node_id is None:
        if user is None or user.node is None:
            raise ConfigError("--node-id is required (or log in as node-<id>)")
        return user.node
    if user is not None and user.node != node_id:
        raise ConfigError(
            f"user {username!r} may not publish as node {node_id!r} on the secure broker "
            f"(its ACL ties node-<id> to node <id>): log in as node-{node_id}"
        )
    return node_id


def camera_id_for(username: str | None, camera_id: str | None) -> str | None:
    """The camera id a camera publishes as: ``camera_id``, else the ``<id>`` of a
    ``camera-<id>`` user, else None (the schedule's own camera ids).

    Raises:
        ConfigError: an edgeprune user that may not publish as this camera.
    """
    user = account_of(username)
    if user is not None and user.camera is None:
        raise ConfigError(f"user {username!r} may not publish images: log in as camera-<id>")
    if user is None or camera_id == user.camera:
        return camera_id
    if camera_id is None:
        return user.camera
    raise ConfigError(
        f"user {username!r} may publish only as camera {user.camera!r}, not {camera_id!r}"
    )


def parse_users(text: str | Iterable[str]) -> tuple[BrokerUser, ...]:
    """Users from ``"camera-cam0,node-n0,..."`` (or a list of names); duplicates are refused."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    if not names:
        raise ConfigError("give at least one broker user")
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate broker users in {names}")
    return tuple(BrokerUser.parse(n) for n in names)


@dataclass(frozen=True)
class Placement:
    """Which stage a node serves; the last stage writes results and exits, not a stage."""

    node: str
    stage: int
    is_last: bool


def parse_placements(text: str) -> dict[str, Placement]:
    """``"n0:0,n1:1"`` -> node -> Placement; the highest stage is the last one."""
    pairs: list[tuple[str, int]] = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        node, _, stage = item.partition(":")
        try:
            pairs.append((check_name("node", node), int(stage)))
        except ValueError as exc:
            raise ConfigError(f"placement {item!r} must be NODE:STAGE") from exc
    if not pairs or any(s < 0 for _, s in pairs):
        raise ConfigError(f"placements {text!r} must be NODE:STAGE with stages >= 0")
    last = max(s for _, s in pairs)
    return {n: Placement(n, s, s == last) for n, s in pairs}


def render_acl(
    users: Sequence[BrokerUser],
    *,
    pipe: str = DEFAULT_ACL_PIPE,
    placements: Mapping[str, Placement] | None = None,
) -> str:
    """The Mosquitto ACL file for ``users`` on pipe ``pipe`` (``+``: any pipe).

    Every writer is tied to its identity: camera ``<c>`` writes only ``stage/0/<c>``; node
    ``<n>`` writes only its own ``nodes/<n>/...`` (status, metrics, Last Will) and
    ``errors/<n>``, never a camera's images nor ``control/#``. A node without a placement may
    write every stage topic past 0 (``stage/+`` cannot match the two-level ``stage/0/<c>``),
    ``results`` and ``exits``: any node may be moved to any stage by a retained plan. With a
    placement it reads only its stage and writes only the next one, or results and exits when
    last. The rules name each identity literally (``user`` sections, no ``pattern`` lines):
    Mosquitto's ``%u`` must fill a whole topic level and would be ``node-n0`` where the topics
    carry ``n0``, and ``%c`` is whatever client id the client chose.
    """
    topics = AclTopics(pipe)
    lines = [
        "# edgeprune ACL, generated by broker.security.render_acl: do not edit, regenerate",
        "# (`edgeprune broker --secure ...`), then SIGHUP mosquitto to reload it.",
        "# No anonymous section: allow_anonymous is false.",
    ]
    for user in users:
        lines += ["", f"user {user.name}"]
        if user.role == "camera":
            rules = [
                ("write", topics.camera_stage(str(user.camera))),
                ("read", topics.results),
            ]
        elif user.role == "controller":
            rules = [
                ("read", topics.everything),
                ("write", topics.control_all),
                ("write", topics.errors),
            ]
        elif user.role == "observer":
            rules = [("read", topics.everything), ("read", "$SYS/#")]
        else:
            node = str(user.node)
            placement = (placements or {}).get(node)
            rules = [
                ("read", topics.plan),
                ("readwrite", topics.node_all(node)),
                ("write", topics.node_errors(node)),
                *(
                    _unplaced_rules(topics)
                    if placement is None
                    else _placed_rules(topics, placement)
                ),
            ]
        lines += [f"topic {access} {topic}" for access, topic in rules]
    return "\n".join(lines) + "\n"


def _unplaced_rules(topics: AclTopics) -> list[tuple[str, str]]:
    return [
        ("read", topics.camera_stage_all),  # every camera's images
        ("readwrite", topics.stage_all),  # stages past 0: one level, never stage/0/<camera>
        ("read", topics.control_stage_all),
        ("write", topics.results),
        ("write", topics.exits),
    ]


def _placed_rules(topics: AclTopics, placement: Placement) -> list[tuple[str, str]]:
    i = placement.stage
    rules = [
        ("read", topics.stage_input(i)),
        ("read", topics.control_stage(i)),
    ]
    if placement.is_last:
        return [*rules, ("write", topics.results), ("write", topics.exits)]
    return [*rules, ("write", topics.stage(i + 1))]


# ---- tools ---------------------------------------------------------------------------------


def _run(cmd: Sequence[str], what: str) -> None:
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60)
    except FileNotFoundError as exc:
        raise BrokerError(f"{what}: {cmd[0]} is not installed") from exc
    except subprocess.CalledProcessError as exc:
        raise BrokerError(f"{what} failed ({' '.join(cmd[:3])} ...): {exc.stderr.strip()}") from exc
    except subprocess.TimeoutExpired as exc:
        raise BrokerError(f"{what}: {cmd[0]} did not finish in 60 s") from exc


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600), replacing it atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def write_password_file(path: Path, passwords: Mapping[str, str]) -> None:
    """Write a Mosquitto password file (PBKDF2-SHA512 hashes) for ``user -> password``.

    The plain ``user:password`` lines go to a 0600 file that ``mosquitto_passwd -U`` hashes in
    place, so no password ever appears on a command line.
    """
    binary = next((b for b in map(shutil.which, _MOSQUITTO_PASSWD) if b), None)
    if binary is None:
        raise BrokerError("mosquitto_passwd is not installed (Debian: apt-get install mosquitto)")
    for user, password in passwords.items():
        if ":" in user or "\n" in user + password:
            raise ConfigError(f"user {user!r}: no ':' or newline in user names and passwords")
    plain = path.with_name(path.name + ".plain")
    _write_private(plain, "".join(f"{u}:{p}\n" for u, p in passwords.items()))
    try:
        _run([binary, "-U", str(plain)], "hashing the password file")
        os.replace(plain, path)
    finally:
        plain.unlink(missing_ok=True)


def _openssl() -> str:
    found = shutil.which("openssl")
    if found is None:
        raise BrokerError("openssl is not installed (Debian: apt-get install openssl)")
    return found


def _new_key(key: Path) -> None:
    """An EC P-256 private key (fast to make and use on a Raspberry Pi), 0600."""
    _run(
        [
            _openssl(),
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            str(key),
        ],
        f"making the key {key.name}",
    )
    os.chmod(key, 0o600)


def make_ca(cert_dir: Path, days: int = 3650) -> tuple[Path, Path]:
    """Create ``ca.crt`` and ``ca.key`` in ``cert_dir`` unless both exist; returns them."""
    crt, key = cert_dir / "ca.crt", cert_dir / "ca.key"
    if crt.exists() and key.exists():
        return crt, key
    cert_dir.mkdir(parents=True, exist_ok=True)
    _new_key(key)
    _run(
        [
            _openssl(),
            "req",
            "-x509",
            "-new",
            "-key",
            str(key),
            "-out",
            str(crt),
            "-days",
            str(days),
            "-sha256",
            "-subj",
            "/CN=edgeprune local CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-addext",
            "subjectKeyIdentifier=hash",
        ],
        "making the local CA",
    )
    return crt, key


def issue_certificate(
    cert_dir: Path,
    name: str,
    *,
    server_names: Sequence[str] = (),
    client: bool = False,
    days: int = CERT_DAYS,
) -> tuple[Path, Path]:
    """Sign ``<name>.crt`` / ``<name>.key`` with the CA in ``cert_dir`` (made if missing).

    A server certificate lists ``server_names`` (IP addresses and DNS names) as subject
    alternative names; a client certificate carries the user name as its common name.
    """
    ca_crt, ca_key = make_ca(cert_dir)
    crt, key, csr = (cert_dir / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
    ext = cert_dir / f"{name}.ext"
    sans = ",".join(f"IP:{n}" if _is_ip(n) else f"DNS:{n}" for n in server_names)
    ext.write_text(
        "\n".join(
            [
                "basicConstraints=critical,CA:FALSE",
                "keyUsage=critical,digitalSignature,keyEncipherment",
                f"extendedKeyUsage={'clientAuth' if client else 'serverAuth'}",
                "subjectKeyIdentifier=hash",
                "authorityKeyIdentifier=keyid,issuer",
                *([f"subjectAltName={sans}"] if sans else []),
            ]
        )
        + "\n"
    )
    _new_key(key)
    try:
        _run(
            [_openssl(), "req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/CN={name}"],
            f"making the request for {name}",
        )
        _run(
            [
                _openssl(),
                "x509",
                "-req",
                "-in",
                str(csr),
                "-CA",
                str(ca_crt),
                "-CAkey",
                str(ca_key),
                "-CAcreateserial",
                "-out",
                str(crt),
                "-days",
                str(days),
                "-sha256",
                "-extfile",
                str(ext),
            ],
            f"signing the certificate of {name}",
        )
    finally:
        csr.unlink(missing_ok=True)
        ext.unlink(missing_ok=True)
    return crt, key


def _is_ip(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


# ---- the whole set-up ------------------------------------------------------------------------


@dataclass(frozen=True)
class SecureSetup:
    """The files of one secure broker run directory and the passwords they hold."""

    run_dir: Path
    users: tuple[BrokerUser, ...]
    passwords: Mapping[str, str]
    client_certs: bool

    @property
    def config_template(self) -> Path:
        """``<run dir>/secure.conf``: the template with the paths filled in."""
        return self.run_dir / "secure.conf"

    @property
    def cert_dir(self) -> Path:
        return self.run_dir / "certs"

    @property
    def ca_cert(self) -> Path:
        return self.cert_dir / "ca.crt"

    @property
    def password_file(self) -> Path:
        return self.run_dir / "passwd"

    @property
    def acl_file(self) -> Path:
        return self.run_dir / "acl"

    @property
    def credentials_file(self) -> Path:
        return self.run_dir / "credentials.json"

    @property
    def env_dir(self) -> Path:
        return self.run_dir / "credentials"

    def settings(self, user: str, host: str, port: int) -> MqttSettings:
        """How ``user`` connects: password, the local CA and, if made, its client cert."""
        if user not in self.passwords:
            raise ConfigError(f"no broker user {user!r} in {self.credentials_file}")
        cert = key = None
        if self.client_certs:
            cert, key = self.cert_dir / f"{user}.crt", self.cert_dir / f"{user}.key"
        return MqttSettings(
            host=host,
            port=port,
            username=user,
            password=self.passwords[user],
            tls_ca=self.ca_cert,
            tls_cert=cert,
            tls_key=key,
        )

    def env(self, user: str, host: str, port: int) -> dict[str, str]:
        """The ``EDGEPRUNE_MQTT_*`` variables that make a component log in as ``user``."""
        s = self.settings(user, host, port)
        env = {
            "EDGEPRUNE_MQTT_HOST": s.host,
            "EDGEPRUNE_MQTT_PORT": str(s.port),
            "EDGEPRUNE_MQTT_USERNAME": user,
            "EDGEPRUNE_MQTT_PASSWORD": str(s.password),
            "EDGEPRUNE_MQTT_TLS_CA": str(s.tls_ca),
        }
        if s.tls_cert is not None and s.tls_key is not None:
            env |= {
                "EDGEPRUNE_MQTT_TLS_CERT": str(s.tls_cert),
                "EDGEPRUNE_MQTT_TLS_KEY": str(s.tls_key),
            }
        return env

    def write_env_files(self, host: str, port: int) -> dict[str, Path]:
        """One ``credentials/<user>.env`` (0600) per user: ``KEY=value`` lines, usable as a
        systemd ``EnvironmentFile``, a Compose ``env_file`` or with ``set -a; . FILE``."""
        self.env_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.env_dir, 0o700)
        paths = {}
        for user in self.passwords:
            path = self.env_dir / f"{user}.env"
            _write_private(
                path, "".join(f"{k}={v}\n" for k, v in self.env(user, host, port).items())
            )
            paths[user] = path
        return paths

    def probe_context(self) -> ssl.SSLContext:
        """A TLS context for readiness probes: verifies the chain, not the host name (the
        probe may dial 127.0.0.1 for a broker listening on 0.0.0.0)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_cert))
        ctx.check_hostname = False
        if self.client_certs:
            probe = self.users[0].name
            ctx.load_cert_chain(
                str(self.cert_dir / f"{probe}.crt"), str(self.cert_dir / f"{probe}.key")
            )
        return ctx


def prepare_secure_broker(
    run_dir: Path,
    users: Sequence[BrokerUser] | str = ",".join(DEFAULT_USERS),
    *,
    pipe: str = DEFAULT_ACL_PIPE,
    placements: Mapping[str, Placement] | None = None,
    server_names: Sequence[str] = DEFAULT_SERVER_NAMES,
    client_certs: bool = False,
    template: Path = SECURE_TEMPLATE,
) -> SecureSetup:
    """Create (or bring up to date) the secure broker files in ``run_dir``.

    Kept across calls: the CA, and the password of every user still listed. Rewritten every
    call: the password file, the ACL, ``secure.conf``, and the server certificate when its
    names change. Returns the set-up; ``MosquittoBroker(template=setup.config_template,
    run_dir=run_dir, tls_context=setup.probe_context())`` runs it.
    """
    users = parse_users(users) if isinstance(users, str) else tuple(users)
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)
    cert_dir = run_dir / "certs"
    cert_dir.mkdir(mode=0o700, exist_ok=True)
    names_file = cert_dir / "server.names"
    names = "\n".join(dict.fromkeys(server_names)) + "\n"
    if (
        not (cert_dir / "server.crt").exists()
        or not names_file.exists()
        or names_file.read_text() != names
    ):
        issue_certificate(cert_dir, "server", server_names=list(dict.fromkeys(server_names)))
        names_file.write_text(names)
    if client_certs:
        for user in users:
            if not (cert_dir / f"{user.name}.crt").exists():
                issue_certificate(cert_dir, user.name, client=True)

    old = _read_credentials(run_dir / "credentials.json")
    passwords = {u.name: old.get(u.name) or secrets.token_urlsafe(18) for u in users}
    setup = SecureSetup(run_dir, users, passwords, client_certs)
    _write_private(
        setup.credentials_file,
        json.dumps(
            {
                "users": {u.name: {"role": u.role, "password": passwords[u.name]} for u in users},
                "ca": str(setup.ca_cert),
            },
            indent=2,
        )
        + "\n",
    )
    write_password_file(setup.password_file, passwords)
    _write_private(setup.acl_file, render_acl(users, pipe=pipe, placements=placements))
    tokens = {
        "CA_FILE": setup.ca_cert,
        "CERT_FILE": cert_dir / "server.crt",
        "KEY_FILE": cert_dir / "server.key",
        "PASSWORD_FILE": setup.password_file,
        "ACL_FILE": setup.acl_file,
        "REQUIRE_CERTIFICATE": "true" if client_certs else "false",
    }
    try:
        text = Path(template).read_text(encoding="utf-8")
    except OSError as exc:
        raise BrokerError(f"cannot read the secure config template {template}: {exc}") from exc
    for token, value in tokens.items():
        text = text.replace(f"@{token}@", str(value))
    setup.config_template.write_text(text, encoding="utf-8")
    return setup


def _read_credentials(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    try:
        users = json.loads(path.read_text(encoding="utf-8"))["users"]
        return {name: str(entry["password"]) for name, entry in users.items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BrokerError(f"cannot read {path} (delete it to make new passwords): {exc}") from exc
