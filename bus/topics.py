"""MQTT topic names of one pipeline (DESIGN.md, "Data flow"). Pure strings, no networking.

edgeprune/<pipe>/stage/0/<camera>          msgpack images of one camera  QoS 1
edgeprune/<pipe>/stage/<i>  (i >= 1)       msgpack stage messages        QoS 1
edgeprune/<pipe>/results                   JSON label per request        QoS 1
edgeprune/<pipe>/exits                     JSON timings per request      QoS 1
edgeprune/<pipe>/control/stage/<i>         JSON level of stage i         QoS 1, retained
edgeprune/<pipe>/control/plan              JSON slice bounds per stage   QoS 1, retained
edgeprune/<pipe>/control/decisions         JSON controller decisions     QoS 1
edgeprune/<pipe>/control/status            JSON controller online/offline QoS 1, retained
                                           (its Last Will says offline)
edgeprune/<pipe>/nodes/<node>/status       JSON online / offline (Will)  QoS 1, retained
edgeprune/<pipe>/nodes/<node>/metrics      JSON queue, service time ...  QoS 0
edgeprune/<pipe>/errors/<node>             JSON what a node rejected     QoS 1
edgeprune/<pipe>/errors                    JSON what the controller did  QoS 1
                                           not accept (errors/# reads both)

The multi-view topology (nodes/fusion.py) adds, per view v, ``view/<v>`` (images), ``fusion/<v>``
(pooled features) and ``control/view/<v>`` (levels): :class:`ViewTopics`.

The camera and node levels let the secure broker's ACL tie a writer to its identity
(broker/security.py): camera-<id> may write only stage/0/<id>, node-<id> only errors/<id>.
The ACL's patterns come from here too (:class:`AclTopics`: the same topics, on one pipe or on
every pipe).

This is the only place a topic string is made (``nodes/pi_camera.py``, copied alone to a
device, keeps its own copy; tests/unit/test_pi_camera_topics.py checks it against this one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.errors import ConfigError

ROOT = "edgeprune"
ANY_PIPE = "+"  # in an ACL pattern: every pipe
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def check_name(kind: str, value: str) -> str:
    """Pipe and node names become topic levels: no '/', '+', '#' or spaces."""
    if not _NAME.match(value):
        raise ConfigError(f"{kind} name {value!r} must be 1-64 of letters, digits, '_', '.', '-'")
    return value


def camera_level(camera: str) -> str:
    """The topic level of a camera id: every character other than letters, digits, ``_``,
    ``.`` and ``-`` becomes ``_``, at most 64 characters (trace camera ids such as
    ``raspberry-pi-2@-0.39,36.96`` carry ``@`` and ``,``)."""
    level = re.sub(r"[^A-Za-z0-9_.\-]", "_", camera)[:64]
    if not level:
        raise ConfigError("camera id must not be empty")
    return level


@dataclass(frozen=True)
class Topics:
    pipe: str = "default"

    def __post_init__(self) -> None:
        check_name("pipe", self.pipe)

    @property
    def base(self) -> str:
        return f"{ROOT}/{self.pipe}"

    def stage(self, i: int) -> str:
        """Stage ``i``'s topic; stage 0's messages go to :meth:`camera_stage` below it."""
        return f"{self.base}/stage/{i}"

    def camera_stage(self, camera: str) -> str:
        """Where camera ``camera`` publishes its images: ``stage/0/<camera level>``."""
        return f"{self.stage(0)}/{camera_level(camera)}"

    @property
    def camera_stage_all(self) -> str:
        """Every camera's images (the node of stage 0 subscribes to this)."""
        return f"{self.stage(0)}/+"

    def stage_input(self, i: int) -> str:
        """The filter the node of stage ``i`` subscribes to."""
        return self.camera_stage_all if i == 0 else self.stage(i)

    def camera_of(self, topic: str) -> str | None:
        """The camera level of a ``stage/0/<camera>`` topic, else None."""
        parts = topic.split("/")
        if len(parts) == 5 and parts[:4] == [ROOT, self.pipe, "stage", "0"] and parts[4]:
            return parts[4]
        return None

    @property
    def results(self) -> str:
        return f"{self.base}/results"

    @property
    def exits(self) -> str:
        return f"{self.base}/exits"

    @property
    def stage_all(self) -> str:
        """``stage/+``: every stage topic past the cameras' (``stage/0/<camera>`` is one
        level deeper, so it does not match)."""
        return f"{self.base}/stage/+"

    def control_stage(self, i: int) -> str:
        return f"{self.base}/control/stage/{i}"

    @property
    def control_all(self) -> str:
        """Everything under ``control/``: levels, the plan, decisions."""
        return f"{self.base}/control/#"

    @property
    def control_stage_all(self) -> str:
        return f"{self.base}/control/stage/+"

    @property
    def plan(self) -> str:
        return f"{self.base}/control/plan"

    @property
    def decisions(self) -> str:
        return f"{self.base}/control/decisions"

    @property
    def controller_status(self) -> str:
        """The controller's retained status (beside what it controls: the ACL lets the
        controller write ``control/#``)."""
        return f"{self.base}/control/status"

    def status(self, node: str) -> str:
        return f"{self.base}/nodes/{check_name('node', node)}/status"

    def metrics(self, node: str) -> str:
        return f"{self.base}/nodes/{check_name('node', node)}/metrics"

    def node_all(self, node: str) -> str:
        """Every topic of node ``node`` (``nodes/<node>/#``: status, metrics)."""
        return f"{self.base}/nodes/{check_name('node', node)}/#"

    @property
    def status_all(self) -> str:
        return f"{self.base}/nodes/+/status"

    @property
    def metrics_all(self) -> str:
        return f"{self.base}/nodes/+/metrics"

    @property
    def errors(self) -> str:
        """The controller's (pipe-level) errors."""
        return f"{self.base}/errors"

    def node_errors(self, node: str) -> str:
        """What node ``node`` rejected: ``errors/<node>``."""
        return f"{self.errors}/{check_name('node', node)}"

    @property
    def errors_all(self) -> str:
        """Every error of the pipe: ``errors/#`` matches ``errors`` and ``errors/<node>``."""
        return f"{self.errors}/#"

    @property
    def everything(self) -> str:
        return f"{self.base}/#"

    def absolute_filter(self, given: str) -> str:
        """A topic filter relative to the pipe (``stage/#``, ``nodes/+/metrics``) made
        absolute; one that already starts at the root (``edgeprune/...``) is kept as it is."""
        if given == ROOT or given.startswith(f"{ROOT}/"):
            return given
        return f"{self.base}/{given.lstrip('/')}"

    def node_of(self, topic: str) -> str | None:
        """The node name in a status or metrics topic, else None."""
        parts = topic.split("/")
        if len(parts) == 5 and parts[:3] == [ROOT, self.pipe, "nodes"]:
            return parts[3]
        return None

    def stage_of(self, topic: str) -> int | None:
        """The stage index in a stage, camera (stage 0) or control/stage topic, else None."""
        parts = topic.split("/")
        try:
            if len(parts) == 4 and parts[2] == "stage":
                return int(parts[3])
            if self.camera_of(topic) is not None:
                return 0
            if len(parts) == 5 and parts[2:4] == ["control", "stage"]:
                return int(parts[4])
        except ValueError:
            return None
        return None


@dataclass(frozen=True)
class AclTopics(Topics):
    """The topics of :class:`Topics` as patterns of the broker's ACL (broker/security.py): the
    pipe may also be ``+`` (:data:`ANY_PIPE`), every pipe. Never publish to these."""

    def __post_init__(self) -> None:
        if self.pipe != ANY_PIPE:
            check_name("pipe", self.pipe)

    @property
    def everything(self) -> str:
        return f"{ROOT}/#" if self.pipe == ANY_PIPE else super().everything


@dataclass(frozen=True)
class ViewTopics:
    """Topics of the multi-view topology (nodes/fusion.py): per view ``v``, the camera's
    images on ``view/<v>``, the branch's pooled features on ``fusion/<v>``, its level on
    ``control/view/<v>``; results, statuses and errors as in :class:`Topics`."""

    pipe: str

    @property
    def base(self) -> Topics:
        return Topics(self.pipe)

    def view(self, v: int) -> str:
        return f"{self.base.base}/view/{v}"

    def features(self, v: int) -> str:
        return f"{self.base.base}/fusion/{v}"

    @property
    def features_all(self) -> str:
        return f"{self.base.base}/fusion/+"

    def control(self, v: int) -> str:
        return f"{self.base.base}/control/view/{v}"
