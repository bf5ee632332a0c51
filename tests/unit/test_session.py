"""The session's pure parts: the outbox order across reconnects, and the reconnect backoff."""

from __future__ import annotations

import pytest

from bus.session import Backoff, Outbox


def _hand_all(outbox: Outbox, connection: int) -> list[str]:
    handed = []
    while (item := outbox.next_due(connection)) is not None:
        outbox.handed(item, connection)
        handed.append(item.topic)
    return handed


def test_outbox_hands_messages_over_in_publish_order() -> None:
    outbox = Outbox()
    for t in ("a", "b", "c"):
        outbox.add(t, t.encode(), 1, False)
    assert _hand_all(outbox, 1) == ["a", "b", "c"]
    assert outbox.next_due(1) is None  # all handed over on this connection
    assert len(outbox) == 3  # none acknowledged yet


def test_outbox_sends_the_unacknowledged_again_in_order_after_a_reconnect() -> None:
    outbox = Outbox()
    items = [outbox.add(t, b"", 1, False) for t in ("a", "b", "c", "d")]
    _hand_all(outbox, 1)
    outbox.acknowledged(items[0])
    outbox.acknowledged(items[2])  # acknowledgements may come out of order
    outbox.add("e", b"", 1, False)  # published while the connection was down
    assert _hand_all(outbox, 2) == ["b", "d", "e"]  # the missed ones first, then the new
    for item in outbox.items():
        outbox.acknowledged(item)
    assert len(outbox) == 0 and outbox.next_due(3) is None


def test_outbox_retry_hands_a_refused_message_again_before_newer_ones() -> None:
    outbox = Outbox()
    first = outbox.add("a", b"", 1, False)
    outbox.handed(first, 1)
    outbox.add("b", b"", 1, False)
    outbox.retry(first)
    assert _hand_all(outbox, 1) == ["a", "b"]


def test_backoff_doubles_up_to_its_maximum_and_resets() -> None:
    backoff = Backoff(first=0.2, maximum=1.0)
    assert [backoff.next() for _ in range(5)] == pytest.approx([0.2, 0.4, 0.8, 1.0, 1.0])
    backoff.reset()
    assert backoff.next() == pytest.approx(0.2)


def test_backoff_rejects_a_first_delay_above_its_maximum() -> None:
    with pytest.raises(ValueError):
        Backoff(first=2.0, maximum=1.0)
