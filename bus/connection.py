"""How to reach the broker: host, port, credentials and TLS. Pure settings (stdlib only), turned
into keyword arguments for the aiomqtt client of :class:`bus.session.Session`.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class MqttSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None  # CA certificate: enables TLS
    tls_cert: Path | None = None  # client certificate (optional)
    tls_key: Path | None = None
    tls_insecure: bool = False  # skip host name verification (self-signed local clusters)
    keepalive: int = 15

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"MQTT port {self.port} out of range")
        if self.keepalive < 2:
            raise ConfigError("keepalive must be at least 2 s")
        for p in (self.tls_ca, self.tls_cert, self.tls_key):
            if p is not None and not Path(p).exists():
                raise ConfigError(f"TLS file {p} does not exist")

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls_ca else 'mqtt'}://{self.host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.tls_ca is None:
            return None
        ctx = ssl.create_default_context(cafile=str(self.tls_ca))
        if self.tls_cert:
            ctx.load_cert_chain(str(self.tls_cert), str(self.tls_key) if self.tls_key else None)
        if self.tls_insecure:
            ctx.check_hostname = False
        return ctx

    def aiomqtt_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``aiomqtt.Client`` (hostname, port, auth, TLS, keepalive)."""
        kwargs: dict[str, Any] = {
            "hostname": self.host,
            "port": self.port,
            "keepalive": self.keepalive,
            # small control and result messages must not wait for delayed ACKs
            "socket_options": ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        }
        if self.username is not None:
            kwargs["username"] = self.username
            kwargs["password"] = self.password
        ctx = self.ssl_context()
        if ctx is not None:
            kwargs["tls_context"] = ctx
            kwargs["tls_insecure"] = self.tls_insecure
        return kwargs
