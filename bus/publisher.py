"""A plain publishing connection for tools that only send (the hop bench): no Last Will, no
status, no reconnect, no outbox. A service uses its session instead.

    async with Publisher(mqtt) as pub:
        await pub.publish(topic, payload, qos=1)

``publish`` hands the payload to the client as it is (no copy) and returns once the broker
acknowledged it (QoS 1). A failed connection or publish raises
:class:`~pipeline.errors.BrokerError`.
"""

from __future__ import annotations

import logging
from types import TracebackType

import aiomqtt

from bus.connection import MqttSettings
from pipeline.errors import BrokerError


class Publisher:
    """One connection that publishes (module docstring)."""

    def __init__(self, mqtt: MqttSettings) -> None:
        self.mqtt = mqtt
        self._client: aiomqtt.Client | None = None

    async def __aenter__(self) -> Publisher:
        if self._client is not None:
            raise RuntimeError("this Publisher is already connected")
        client = aiomqtt.Client(**self.mqtt.aiomqtt_kwargs(), logger=logging.getLogger("aiomqtt"))
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as exc:
            raise BrokerError(f"publisher: broker {self.mqtt.url}: {exc}") from exc
        self._client = client
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            await client.__aexit__(exc_type, exc, tb)
        except aiomqtt.MqttError as error:
            raise BrokerError(f"publisher: broker {self.mqtt.url}: {error}") from error

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        client = self._client
        if client is None:
            raise RuntimeError("publish outside `async with Publisher(...)`")
        try:
            await client.publish(topic, payload, qos=qos, retain=retain)
        except aiomqtt.MqttError as exc:
            raise BrokerError(f"publisher: broker {self.mqtt.url}: {exc}") from exc
