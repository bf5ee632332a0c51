"""MQTT topic names of one pipeline (DESIGN.md, "Data flow"). Pure strings, no networking.

edgeprune/<pipe>/stage/<i>                 msgpack stage messages        QoS 1
edgeprune/<pipe>/results                   JSON label per request        QoS 1
edgeprune/<pipe>/exits                     JSON timings per request      QoS 1
edgeprune/<pipe>/control/stage/<i>         JSON level of stage i         QoS 1, retained
edgeprune/<pipe>/control/plan              JSON slice bounds per stage   QoS 1, retained
edgeprune/<pipe>/control/decisions         JSON controller decisions     QoS 1
edgeprune/<pipe>/nodes/<node>/status       JSON online / offline (Will)  QoS 1, retained
edgeprune/<pipe>/nodes/<node>/metrics      JSON queue, service time ...  QoS 0
edgeprune/<pipe>/errors                    JSON what was rejected, why   QoS 1
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.errors import ConfigError

ROOT = "edgeprune"
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def check_name(kind: str, value: str) -> str:
    """Pipe and node names become topic levels: no '/', '+', '#' or spaces."""
    if not _NAME.match(value):
        raise ConfigError(f"{kind} name {value!r} must be 1-64 of letters, digits, '_', '.', '-'")
    return value


@dataclass(frozen=True)
class Topics:
    pipe: str = "default"

    def __post_init__(self) -> None:
        check_name("pipe", self.pipe)

    @property
    def base(self) -> str:
        return f"{ROOT}/{self.pipe}"

    def stage(self, i: int) -> str:
        return f"{self.base}/stage/{i}"

    @property
    def results(self) -> str:
        return f"{self.base}/results"

    @property
    def exits(self) -> str:
        return f"{self.base}/exits"

    def control_stage(self, i: int) -> str:
        return f"{self.base}/control/stage/{i}"

    @property
    def control_stage_all(self) -> str:
        return f"{self.base}/control/stage/+"

    @property
    def plan(self) -> str:
        return f"{self.base}/control/plan"

    @property
    def decisions(self) -> str:
        return f"{self.base}/control/decisions"

    def status(self, node: str) -> str:
        return f"{self.base}/nodes/{check_name('node', node)}/status"

    def metrics(self, node: str) -> str:
        return f"{self.base}/nodes/{check_name('node', node)}/metrics"

    @property
    def status_all(self) -> str:
        return f"{self.base}/nodes/+/status"

    @property
    def metrics_all(self) -> str:
        return f"{self.base}/nodes/+/metrics"

    @property
    def errors(self) -> str:
        return f"{self.base}/errors"

    @property
    def everything(self) -> str:
        return f"{self.base}/#"

    def node_of(self, topic: str) -> str | None:
        """The node name in a status or metrics topic, else None."""
        parts = topic.split("/")
        if len(parts) == 5 and parts[:3] == [ROOT, self.pipe, "nodes"]:
            return parts[3]
        return None

    def stage_of(self, topic: str) -> int | None:
        """The stage index in a stage or control/stage topic, else None."""
        parts = topic.split("/")
        try:
            if len(parts) == 4 and parts[2] == "stage":
                return int(parts[3])
            if len(parts) == 5 and parts[2:4] == ["control", "stage"]:
                return int(parts[4])
        except ValueError:
            return None
        return None
