"""End-to-end experiments: one TOML scenario, every part as its own process, reports and plots.

    config.py       ExperimentConfig from TOML (trace, plan, emulated devices, controller)
    calibration.py  reuse or measure the calibration the controller loads
    launcher.py     ProcessGroup: children in their own process groups, always cleaned up
    monitor.py      Recorder (the harness's MQTT subscriber) and the live status line
    runner.py       one run of one policy: broker, nodes, hogs, controller, camera
    report.py       metrics, the JSON and Markdown reports, the comparison
    plots.py        timeline and latency-CDF plots
    session.py      several policies in a row, and the files they write

``edgeprune experiment`` and ``edgeprune demo`` are the command lines over :func:`run_session`.
"""

from edgeprune.experiment.config import ExperimentConfig, load_config
from edgeprune.experiment.launcher import ExperimentError, ProcessGroup
from edgeprune.experiment.report import RunReport, compare_summary
from edgeprune.experiment.session import SessionResult, run_session

__all__ = [
    "ExperimentConfig",
    "ExperimentError",
    "ProcessGroup",
    "RunReport",
    "SessionResult",
    "compare_summary",
    "load_config",
    "run_session",
]
