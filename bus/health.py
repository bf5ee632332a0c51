"""The containers' health check (docker-compose.yml, ``edgeprune health``): a service is
healthy when the broker accepts its login and, for a slice node, when the node's retained
status says ``online``.
"""

from __future__ import annotations

import logging

from bus.connection import MqttSettings
from bus.messages import StatusMessage
from bus.observer import Observed, Observer
from bus.session import Session
from bus.topics import Topics
from pipeline.errors import BrokerError, BusError, CodecError

log = logging.getLogger(__name__)


async def is_healthy(
    mqtt: MqttSettings, topics: Topics, node: str | None = None, wait_s: float = 4.0
) -> bool:
    """True when the broker accepts the login of ``mqtt`` and, with ``node``, when that node's
    retained status (read within ``wait_s`` seconds) says it is online."""
    if node is None:
        try:
            async with Session(mqtt, name="health") as session:
                await session.wait_connected(wait_s)
                return True
        except BusError as exc:
            log.warning("unhealthy: %s", exc)
            return False
    statuses: list[Observed] = []
    try:
        await Observer(mqtt, [(topics.status(node), 1)], statuses.append).watch(
            count=1, timeout=wait_s
        )
    except BrokerError as exc:
        log.warning("unhealthy: %s", exc)
        return False
    if not statuses:
        log.warning("unhealthy: no retained status of node %s within %.0f s", node, wait_s)
        return False
    return says_online(statuses[0].payload)


def says_online(payload: bytes | bytearray) -> bool:
    """Whether a status message says ``online`` (one that does not decode does not)."""
    try:
        return StatusMessage.from_json(payload).online
    except CodecError:
        return False
