"""End-to-end experiments: one TOML scenario, every part as its own process, reports and plots.

    config.py       ExperimentConfig from TOML (trace, plan, emulated devices, controller)
    calibration.py  reuse or measure the calibration the controller loads
    launcher.py     ProcessGroup: children in their own process groups, always cleaned up
    monitor.py      the live status line over the run's bus.observer.Recorder
    runner.py       one run of one policy: broker, nodes, hogs, controller, camera
    report.py       metrics, the JSON and Markdown reports, the comparison
    plots.py        timeline and latency-CDF plots
    session.py      several policies in a row, and the files they write
    scenarios/      the shipped scenarios (demo, paper, restore), package data

``edgeprune experiment`` and ``edgeprune demo`` are the command lines over
:func:`experiment.session.run_session`. Importing this package loads nothing else (the CLI's
``--help`` stays free of torch).
"""

from pathlib import Path

SCENARIOS_DIR = Path(__file__).resolve().parent / "scenarios"
"""The shipped scenarios (``demo.toml``, ``paper.toml``, ``restore.toml``)."""
