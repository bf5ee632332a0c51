"""Camera-trap traces: format, shipped data, statistics, the fitted model, replay, CLI."""

from __future__ import annotations

import argparse
import json
import math
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import TraceError
from traces.convert import convert_raw, species_label
from traces.format import (
    Arrival,
    Trace,
    available_traces,
    default_trace_path,
    format_trace,
    load_trace,
    parse_trace,
    resolve_trace,
    save_trace,
)
from traces.model import (
    TraceModel,
    fit_discrete_lognormal,
    fit_model,
    generate,
    load_model,
    save_model,
)
from traces.replay import replay_schedule
from traces.stats import (
    index_of_dispersion,
    per_minute_counts,
    summarize,
    time_of_day_histogram,
    triggers,
    visits,
    within_visit_gaps,
)

HEADER = "# edgeprune-trace: 1\n# name: hand\n# t0: 2021-01-01T00:00:00\n"


@pytest.fixture(scope="module")
def orinoquia() -> Trace:
    return load_trace(default_trace_path("orinoquia_day1"))


@pytest.fixture(scope="module")
def dsail() -> Trace:
    return load_trace(default_trace_path("dsail_porini"))


@pytest.fixture(scope="module")
def orinoquia_model(orinoquia: Trace) -> TraceModel:
    return fit_model([orinoquia])


# ---------------------------------------------------------------- format and shipped data


def test_shipped_traces_load(dsail: Trace, orinoquia: Trace) -> None:
    assert {"dsail_porini", "orinoquia_day1"} <= set(available_traces())
    assert len(dsail) == 2932 and len(dsail.cameras) == 13
    assert len(orinoquia) == 804 and len(orinoquia.cameras) == 10
    assert orinoquia.t0 == datetime(2020, 1, 8) and orinoquia.duration_s == 86400
    assert dsail.t0 == datetime(2021, 6, 25)
    for trace in (dsail, orinoquia):
        times = trace.times()
        assert times == sorted(times) and times[-1] <= trace.span_s
        assert "source" not in trace.metadata and trace.source
        assert trace.metadata["licence"]
    assert orinoquia.arrivals[0].sequence and dsail.arrivals[0].species == "warthog"
    assert resolve_trace("orinoquia_day1") == default_trace_path("orinoquia_day1")


def test_unknown_shipped_trace_lists_the_known_ones() -> None:
    with pytest.raises(TraceError, match="orinoquia_day1"):
        default_trace_path("nope")
    with pytest.raises(TraceError, match="no such trace file"):
        resolve_trace("missing/dir/x.csv")


@pytest.mark.parametrize(
    ("body", "line", "reason"),
    [
        ("timestamp,camera\n1.0,A\nabc,A\n", 6, "bad timestamp"),
        ("timestamp,camera\n1.0,A\n-3,A\n", 6, "must be finite and >= 0"),
        ("timestamp,camera\n1.0,A\nnan,A\n", 6, "must be finite"),
        ("timestamp,camera\n\n# a note\n1.0,\n", 7, "missing camera"),
        ("timestamp,camera,label\n1.0,A,3\n2.0,A\n", 6, "expected 3 fields"),
        ("timestamp,camera\n1.0,A,extra\n", 5, "expected 2 fields"),
        ("timestamp,camera,label\n1.0,A,cat\n", 5, "not an integer class id"),
        ("timestamp,camera,label\n1.0,A,-1\n", 5, "negative"),
        ("timestamp,camera,lable\n", 4, "unknown column 'lable'"),
        ("timestamp,camera,species,species\n", 4, "appears twice"),
        ("camera,timestamp\n", 4, "must start with 'timestamp,camera'"),
    ],
)
def test_loader_rejects_malformed_rows_with_line_number(
    tmp_path: Path, body: str, line: int, reason: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(HEADER + body, encoding="utf-8")
    with pytest.raises(TraceError, match=reason) as info:
        load_trace(path)
    assert info.value.line == line
    assert str(info.value).startswith(f"line {line}:")


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("# t0: yesterday\ntimestamp,camera\n", 1, "bad t0"),
        ("# t0: 2021-01-01T00:00:00+02:00\ntimestamp,camera\n", 1, "naive"),
        ("# name: x\n# duration_s: 10\ntimestamp,camera\n11,A\n2,A\n", 4, "after the trace end"),
        ("# duration_s: soon\ntimestamp,camera\n", 1, "bad duration_s"),
        ("# edgeprune-trace: 2\ntimestamp,camera\n", 1, "unsupported trace format version"),
        ("# name: a\n# name: b\ntimestamp,camera\n", 2, "given twice"),
        ("# only a preamble\n", None, "no header row"),
    ],
)
def test_loader_rejects_bad_preamble(text: str, line: int | None, reason: str) -> None:
    with pytest.raises(TraceError, match=reason) as info:
        parse_trace(text, "x")
    assert info.value.line == line


def test_loader_sorts_unsorted_rows_and_keeps_metadata() -> None:
    text = (
        "# name: hand\n# site: north\n# free text without a key\n"
        "timestamp,camera,species,label\n5,B,,\n1.5,A,zebra,9\n3,A,,\n"
    )
    trace = parse_trace(text, "fallback")
    assert trace.name == "hand" and trace.metadata == {"site": "north"}
    assert trace.times() == [1.5, 3.0, 5.0]
    assert trace.arrivals[0] == Arrival(1.5, "A", None, "zebra", 9)
    assert trace.duration_s is None and trace.span_s == 5.0


def test_arrival_and_trace_validate() -> None:
    for bad in [
        dict(t=-1.0, camera="A"),
        dict(t=math.inf, camera="A"),
        dict(t=0.0, camera=""),
        dict(t=0.0, camera=" A"),
        dict(t=0.0, camera="A\nB"),
        dict(t=0.0, camera="A", label=-2),
        dict(t=0.0, camera="A", sequence=""),
    ]:
        with pytest.raises(TraceError):
            Arrival(**bad)  # type: ignore[arg-type]
    with pytest.raises(TraceError, match="after the trace end"):
        Trace((Arrival(5.0, "A"),), "x", duration_s=4.0)


def test_save_load_round_trip(tmp_path: Path, orinoquia: Trace) -> None:
    path = save_trace(orinoquia, tmp_path / "sub" / "copy.csv")
    assert load_trace(path) == orinoquia
    hand = Trace(
        (Arrival(0.25, 'cam "1", north', "s1", "impala, warthog", 3), Arrival(1e6 + 0.000001, "B")),
        "hand",
        "made up",
        datetime(2021, 3, 4, 5, 6),
        2e6,
        {"note": "two cameras"},
    )
    assert load_trace(save_trace(hand, tmp_path / "hand.csv")) == hand
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + format_trace(hand).replace("\n", "\r\n").encode())
    assert load_trace(bom) == hand


_names = (
    st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=12)
    .map(str.strip)
    .filter(bool)
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0, 1e7).map(lambda t: round(t, 6)),
            _names,
            st.none() | _names,
            st.none() | st.integers(0, 999),
        ),
        min_size=0,
        max_size=20,
    )
)
def test_format_round_trip_property(rows: list[tuple[float, str, str | None, int | None]]) -> None:
    trace = Trace(tuple(Arrival(t, c, None, s, lab) for t, c, s, lab in rows), "prop")
    assert parse_trace(format_trace(trace), "other") == trace


def test_converter_reproduces_shipped_files(tmp_path: Path) -> None:
    raw = tmp_path / "raw.csv"
    raw.write_text(
        'timestamp,camera,species,animals\n2021-06-25T14:55:11,"pi@1,2",zebra,1\n'
        '2021-06-26T00:00:05,"pi@1,2","impala, warthog","2,1"\n',
        encoding="utf-8",
    )
    trace = convert_raw(raw, "dsail", classes=("bear", "Zebra"))
    assert trace.t0 == datetime(2021, 6, 25) and trace.duration_s == 2 * 86400
    assert trace.times() == [53711.0, 86405.0]
    assert [a.label for a in trace.arrivals] == [1, None]
    assert trace.arrivals[1].species == "impala, warthog"
    assert species_label("cat", None) is None
    raw.write_text("timestamp,camera,species,animals\n2021-06-25T25:00:00,A,x,1\n")
    with pytest.raises(TraceError, match="bad timestamp") as info:
        convert_raw(raw, "dsail")
    assert info.value.line == 2
    with pytest.raises(TraceError, match="not a orinoquia file"):
        convert_raw(raw, "orinoquia")
    # the raw files lie in ../shared/traces beside the repository, where present
    shared = (
        Path(__file__).resolve().parents[2].parent / "shared/traces/orinoquia_day1_arrivals.csv"
    )
    if shared.is_file():
        assert format_trace(convert_raw(shared, "orinoquia")) == default_trace_path(
            "orinoquia_day1"
        ).read_text(encoding="utf-8")


# ---------------------------------------------------------------- statistics


def _hand_trace() -> Trace:
    a = [0, 1, 2, 5, 6, 7, 200]
    b = [30, 31]
    return Trace(
        tuple([Arrival(float(t), "A") for t in a] + [Arrival(float(t), "B") for t in b]),
        "hand",
        t0=datetime(2021, 1, 1, 23, 59),
        duration_s=300.0,
    )


def test_stats_on_a_hand_made_trace() -> None:
    trace = _hand_trace()
    counts = per_minute_counts(trace)
    assert counts.tolist() == [8, 0, 0, 1, 0]
    # mean 1.8, var 65/5 - 1.8^2 = 9.76
    assert index_of_dispersion(counts) == pytest.approx(9.76 / 1.8)
    assert math.isnan(index_of_dispersion(np.zeros(4)))
    vs = visits(trace, gap_s=60)
    assert [(v.camera, len(v)) for v in vs] == [("A", 6), ("B", 2), ("A", 1)]
    assert triggers(vs[0], burst_gap_s=1.5) == [[0, 1, 2], [5, 6, 7]]
    assert sorted(within_visit_gaps(vs).tolist()) == [1, 1, 1, 1, 1, 3]
    hours = time_of_day_histogram(trace)  # t0 is 23:59: t < 60 s is hour 23
    assert hours[23] == 8 and hours[0] == 1 and hours.sum() == 9
    s = summarize(trace)
    assert (s.images, s.cameras, s.visits, s.images_per_visit_max) == (9, 2, 3, 6)
    assert s.images_per_visit_median == 2 and s.images_per_trigger_median == 2.5  # 3,3,2,1
    assert s.busiest_hour_of_day == 23 and s.max_per_minute == 8
    json.dumps(s.to_dict())


def test_real_traces_are_bursty(dsail: Trace, orinoquia: Trace) -> None:
    for trace in (dsail, orinoquia):
        assert 15 < index_of_dispersion(per_minute_counts(trace)) < 30
    s = summarize(orinoquia)
    assert (s.visits, s.images_per_visit_median, s.images_per_trigger_median) == (45, 9, 3)


# ---------------------------------------------------------------- model


def test_model_fit_and_json_round_trip(tmp_path: Path, orinoquia_model: TraceModel) -> None:
    m = orinoquia_model
    assert m.n_visits == 45 and m.camera_hours == pytest.approx(240)
    assert sum(m.hourly_visit_rate) == pytest.approx(45 / 10)  # visits per camera-day
    assert all(m.hourly_visit_rate[h] == 0 for h in range(6))
    assert max(range(len(m.images_per_trigger)), key=m.images_per_trigger.__getitem__) == 2
    assert 2 <= m.retrigger_gap_quantiles[len(m.retrigger_gap_quantiles) // 2] <= 4
    data = json.loads(json.dumps(m.to_dict()))
    assert TraceModel.from_dict(data) == m
    assert load_model(save_model(m, tmp_path / "m.json")) == m
    with pytest.raises(TraceError, match="not a trace model"):
        TraceModel.from_dict({**data, "version": 99})
    with pytest.raises(TraceError, match="bad trace model"):
        TraceModel.from_dict({**data, "hourly_visit_rate": [1.0] * 23})
    with pytest.raises(TraceError, match="bad trace model"):
        TraceModel.from_dict({k: v for k, v in data.items() if k != "triggers_mu"})


def test_discrete_lognormal_mle_recovers_parameters() -> None:
    rng = np.random.default_rng(7)
    sample = np.maximum(1, np.round(np.exp(1.2 + 0.9 * rng.standard_normal(4000)))).astype(int)
    mu, sigma = fit_discrete_lognormal(sample.tolist())
    assert mu == pytest.approx(1.2, abs=0.08) and sigma == pytest.approx(0.9, abs=0.08)


def test_generate_is_deterministic_per_seed(orinoquia_model: TraceModel) -> None:
    a = generate(orinoquia_model, 6 * 3600, 4, seed=5, t0=datetime(2020, 1, 8, 8))
    b = generate(orinoquia_model, 6 * 3600, 4, seed=5, t0=datetime(2020, 1, 8, 8))
    c = generate(orinoquia_model, 6 * 3600, 4, seed=6, t0=datetime(2020, 1, 8, 8))
    assert a == b and len(a) > 0 and a.times() != c.times()
    assert a.duration_s == 6 * 3600 and a.times()[-1] < 6 * 3600
    assert set(a.cameras) <= {"cam00", "cam01", "cam02", "cam03"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generated_day_is_bursty_like_the_real_one(
    orinoquia: Trace, orinoquia_model: TraceModel, seed: int
) -> None:
    gen = generate(orinoquia_model, 86400, 10, seed=seed, t0=orinoquia.t0 or datetime(2020, 1, 8))
    real, syn = summarize(orinoquia), summarize(gen)
    assert 5 < syn.dispersion_per_minute < 80
    assert 0.4 < syn.images_per_visit_mean / real.images_per_visit_mean < 2.5
    assert 1 / 3 <= syn.images_per_visit_median / real.images_per_visit_median <= 3
    assert syn.images_per_trigger_median == 3
    # time-of-day modulation: no visit starts in an hour where the real rate is zero
    start_hours = {int(v.start // 3600) % 24 for v in visits(gen)}
    assert all(orinoquia_model.hourly_visit_rate[h] > 0 for h in start_hours)
    assert time_of_day_histogram(gen)[:6].sum() == 0  # night
    # a Poisson stream with the same number of images would have dispersion ~1
    rng = np.random.default_rng(seed)
    poisson = Trace(
        tuple(Arrival(float(t), "p") for t in rng.uniform(0, 86400, len(gen))),
        "poisson",
        duration_s=86400.0,
    )
    assert index_of_dispersion(per_minute_counts(poisson)) < 1.5


def test_dsail_model_keeps_the_herd_tail(dsail: Trace) -> None:
    real = summarize(dsail)
    kde, lognormal = fit_model([dsail]), fit_model([dsail], triggers_model="lognormal")
    assert kde.mean_images_per_visit() == pytest.approx(real.images_per_visit_mean, rel=0.3)
    assert lognormal.mean_images_per_visit() < 0.6 * real.images_per_visit_mean
    gen = summarize(generate(kde, 20 * 86400, 13, seed=1, t0=datetime(2021, 6, 25)))
    assert 8 < gen.dispersion_per_minute < 60
    assert gen.images_per_visit_median == pytest.approx(real.images_per_visit_median, abs=2)


def test_generate_rejects_bad_arguments(orinoquia_model: TraceModel) -> None:
    for kwargs in [
        dict(duration_s=0),
        dict(duration_s=60, cameras=0),
        dict(duration_s=60, cameras=["a", "a"]),
        dict(duration_s=60, rate_scale=-1),
    ]:
        with pytest.raises(TraceError):
            generate(orinoquia_model, **kwargs)  # type: ignore[arg-type]
    busy = generate(
        orinoquia_model, 3600, ["x"], seed=0, t0=datetime(2020, 1, 8, 11), rate_scale=20
    )
    assert busy.cameras == ("x",) and len(busy) > 100


# ---------------------------------------------------------------- replay


def _simple(name: str, times: list[float], camera: str, t0: datetime | None = None) -> Trace:
    return Trace(tuple(Arrival(t, camera) for t in times), name, t0=t0)


def test_replay_merges_and_compresses() -> None:
    a = _simple("a", [0.0, 10.0, 20.0], "A")
    b = _simple("b", [5.0, 10.0], "B")
    sched = replay_schedule([a, b], compression=10, start_offset_s=1.0)
    assert [(s.send_at_s, s.arrival.camera) for s in sched] == [
        (1.0, "A"),
        (1.5, "B"),
        (2.0, "A"),
        (2.0, "B"),
        (3.0, "A"),
    ]
    assert [s.send_at_s for s in replay_schedule([a, b], max_images=2)] == [0.0, 5.0]
    assert replay_schedule([a, b], max_images=0) == []
    windowed = replay_schedule([a, b], compression=2, window=(5.0, 20.0))
    assert [(s.send_at_s, s.arrival.t) for s in windowed] == [(0.0, 5.0), (2.5, 10.0), (2.5, 10.0)]
    send_at, arrival = sched[0]  # plain (send_at_s, Arrival) tuples
    assert arrival is a.arrivals[0] and send_at == 1.0


def test_replay_caps_idle_gaps_before_compression() -> None:
    trace = _simple("a", [100.0, 101.0, 5000.0, 5002.0, 9000.0], "A")
    sched = replay_schedule([trace], compression=2, max_idle_s=10)
    # leading gap 100 -> 10; 4899 -> 10; 3998 -> 10; bursts keep their spacing
    assert [s.send_at_s for s in sched] == [5.0, 5.5, 10.5, 11.5, 16.5]
    assert [s.send_at_s for s in replay_schedule([trace], max_idle_s=1000)] == [
        100.0,
        101.0,
        1101.0,
        1103.0,
        2103.0,
    ]


def test_replay_align_clock_and_validation() -> None:
    a = _simple("a", [0.0], "A", datetime(2021, 1, 1, 12))
    b = _simple("b", [0.0], "B", datetime(2021, 1, 1, 12, 1))
    assert [s.send_at_s for s in replay_schedule([b, a], align="clock")] == [0.0, 60.0]
    assert [s.send_at_s for s in replay_schedule([b, a])] == [0.0, 0.0]
    with pytest.raises(TraceError, match="t0"):
        replay_schedule([a, _simple("c", [1.0], "C")], align="clock")
    for kwargs in [
        dict(compression=0),
        dict(max_idle_s=-1),
        dict(window=(5, 5)),
        dict(max_images=-1),
        dict(start_offset_s=-1),
        dict(align="wall"),
    ]:
        with pytest.raises(TraceError):
            replay_schedule([a], **kwargs)  # type: ignore[arg-type]


def test_replay_of_a_real_trace_is_ordered(orinoquia: Trace) -> None:
    sched = replay_schedule([orinoquia], compression=60, max_idle_s=120)
    times = [s.send_at_s for s in sched]
    assert len(sched) == 804 and times == sorted(times)
    assert times[-1] < 3 * 3600 / 60  # idle hours removed: well under the 24 h / 60


# ---------------------------------------------------------------- command line


def _run(argv: list[str]) -> int:
    from edgeprune.commands import trace as command

    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_parse_duration() -> None:
    from edgeprune.commands.trace import parse_duration

    assert [parse_duration(v) for v in ("90", "90s", "15m", "1.5h", "2d")] == [
        90,
        90,
        900,
        5400,
        172800,
    ]
    for bad in ("", "1w", "-1h", "h", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)


def test_cli_show_fit_generate_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["trace", "show", "orinoquia_day1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["traces"][0]
    assert shown["images"] == 804 and shown["visits"] == 45
    model = tmp_path / "m.json"
    assert _run(["trace", "fit", "orinoquia_day1", "--out", str(model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["n_visits"] == 45
    out, png = tmp_path / "g.csv", tmp_path / "cmp.png"
    assert (
        _run(
            [
                "trace",
                "generate",
                "--model",
                str(model),
                "--duration",
                "1d",
                "--cameras",
                "3",
                "--seed",
                "4",
                "--start",
                "2020-01-08T00:00",
                "--out",
                str(out),
                "--plot",
                str(png),
                "--real",
                "orinoquia_day1",
            ]
        )
        == 0
    )
    assert "dispersion" in capsys.readouterr().out
    assert load_trace(out).metadata["seed"] == "4"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw = tmp_path / "raw.csv"
    raw.write_text("timestamp,camera,sequence,frame\n2020-01-08T08:19:46,A05,s1,0\n")
    assert (
        _run(
            ["trace", "convert", str(raw), "--kind", "orinoquia", "--out", str(tmp_path / "c.csv")]
        )
        == 0
    )
    assert load_trace(tmp_path / "c.csv").arrivals[0] == Arrival(30_000 - 14.0, "A05", "s1")
    assert _run(["trace", "show", str(out), "orinoquia_day1"]) == 0
    assert "per-minute dispersion" in capsys.readouterr().out
