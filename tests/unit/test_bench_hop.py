"""What part (b) of `edgeprune bench hop` keeps of the pipe's traffic while the pipeline is
saturated: the first receipt of each result, completions per run tag, the nodes online, the
nodes' metrics; a bad message is skipped, never counted."""

from __future__ import annotations

from bench.hop import _Listener
from bus.messages import MetricsMessage, ResultMessage, StatusMessage
from bus.observer import Observed, subscriptions_for
from bus.topics import Topics

TOPICS = Topics("bench-test")


def _result(request_id: str) -> bytes:
    return ResultMessage(
        request_id=request_id,
        camera="cam0",
        label="cat",
        label_index=1,
        score=0.9,
        true_label=1,
        correct=True,
        levels=(0, 0),
        entry_ts=1.0,
    ).to_json()


def test_the_listener_keeps_first_results_per_tag_statuses_and_metrics() -> None:
    listener = _Listener(TOPICS)
    assert listener.subscriptions() == subscriptions_for(TOPICS, ("result", "status", "metrics"))
    feed = [
        (TOPICS.status("n0"), StatusMessage(node="n0", state="online", ts=1.0).to_json()),
        (TOPICS.status("n1"), StatusMessage(node="n1", state="online", ts=1.0).to_json()),
        (TOPICS.results, _result("cam0-warm-000000")),
        (TOPICS.results, _result("cam0-burst-000000")),
        (TOPICS.results, _result("cam0-burst-000000")),  # a QoS 1 duplicate
        (TOPICS.results, _result("cam0-burst-000001")),
        (TOPICS.results, b'{"v":1,"kind":"result"'),  # malformed: skipped
        (TOPICS.metrics("n0"), MetricsMessage(node="n0", ts=2.0, stage=0, processed=3).to_json()),
        (TOPICS.metrics("n1"), b'{"v":1,"kind":"metrics","node":"n1"}'),  # no ts: skipped
        (TOPICS.status("n1"), StatusMessage(node="n1", state="offline", ts=3.0).to_json()),
        (TOPICS.status("n0"), b""),  # a retained status being cleared
    ]
    for rx, (topic, payload) in enumerate(feed):
        listener.on_message(Observed(topic, payload, False, float(rx)))
    assert listener.first_result == {
        "cam0-warm-000000": 2.0,
        "cam0-burst-000000": 3.0,
        "cam0-burst-000001": 5.0,
    }
    assert listener.completed == {"warm": 1, "burst": 2}
    assert listener.online == {"n0"}
    assert [(rx, m.node, m.processed) for rx, m in listener.metrics] == [(7.0, "n0", 3)]
