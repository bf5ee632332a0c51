"""`edgeprune bench codec`: what the msgpack stage codec costs next to a plain memory copy.

For float32 activation tensors of several sizes, times encode_stage + decode_stage (a full
stage message: ids, timestamps, two hops) against one memory copy of the same bytes
(``ndarray.copy``), in milliseconds per MiB of tensor, and prints the ratio codec / memcpy.
The float16 transport (half the bytes on the wire, decoded back to float32) is timed too.
Warm-up first, then the median and 95th percentile of many runs, timed with perf_counter;
codec and memcpy runs are interleaved in pairs so both see the same machine state.

From about 1 MiB up, glibc maps large blocks fresh from the kernel and gives them back on
free, so page faults can dominate both columns; the ratio stays meaningful. Run with
MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=268435456 to see the copy-bound cost.
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
from collections.abc import Callable
from typing import Any

from bench.goals import BenchReport, GoalSpec
from edgeprune.commands._common import add_json, format_table

DEFAULT_SIZES = ("16KB", "200KB", "800KB", "4MB")
MIB = 1024 * 1024
_UNITS = {"": 1, "B": 1, "KB": 1024, "KIB": 1024, "MB": MIB, "MIB": MIB}
# a comparison with a memory copy, no promise: the hop's budget is `bench hop`'s goal
GOALS: tuple[GoalSpec, ...] = ()


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "codec",
        help="msgpack stage codec (encode+decode) vs a plain memory copy",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--sizes",
        type=_parse_sizes,
        default=list(DEFAULT_SIZES),
        help="comma-separated float32 tensor sizes (KB = 1024 bytes, MB = 1024 KB)",
    )
    parser.add_argument("--repeats", type=_repeats, default=200, help="timed runs per size")
    add_json(parser)
    parser.set_defaults(func=run)


def _parse_sizes(text: str) -> list[str]:
    sizes = [s.strip() for s in text.split(",") if s.strip()]
    for s in sizes:
        _size_bytes(s)
    return sizes


def _repeats(text: str) -> int:
    if not text.isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError(f"--repeats must be an integer >= 2, got {text!r}")
    return int(text)


def _size_bytes(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)", text.strip())
    if not match or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 16KB, 4MB)")
    n = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if n < 4:
        raise argparse.ArgumentTypeError(f"size {text!r} is smaller than one float32")
    return n


def _timings(fns: list[Callable[[], object]], repeats: int) -> list[list[float]]:
    """Wall seconds per call of each function, calls interleaved one by one, after a warm-up."""
    from pipeline.calibration.timing import time_calls

    times = time_calls(
        fns, runs=repeats, warmup=max(5, repeats // 10), rounds=repeats, torch_inference=False
    )
    return [t.wall.tolist() for t in times]


def _ms_per_mib(samples: list[float], nbytes: int) -> tuple[float, float]:
    """(median, 95th percentile) in milliseconds per MiB."""
    scale = 1e3 * MIB / nbytes
    p95 = statistics.quantiles(samples, n=20, method="inclusive")[-1]
    return statistics.median(samples) * scale, p95 * scale


def measure(sizes: list[str], repeats: int) -> dict[str, Any]:
    import msgpack
    import numpy as np

    from pipeline.codec import Hop, StageMessage

    rng = np.random.default_rng(0)
    hops = (Hop(0, "pi-a", 0.003, 0.041, 0), Hop(1, "pi-b", 0.001, 0.037, 2))
    rows = []
    for size in sizes:
        nbytes = _size_bytes(size) // 4 * 4
        x = rng.standard_normal((1, nbytes // 4), dtype=np.float32)
        msg = StageMessage(
            "cam0-bench-000001", "cam0", 2, 1.7e9, 1.7e9, label=3, hops=hops, tensor=x
        )
        rows.append({"size": size, **_measure_one(msg, x, repeats)})
    return {
        "bench": "codec",
        "unit": "ms per MiB of float32 tensor (MB = 2**20 bytes)",
        "repeats": repeats,
        "sizes": rows,
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "msgpack": ".".join(map(str, msgpack.version)),
        },
        "machine": platform.machine(),
    }


def _measure_one(msg: Any, x: Any, repeats: int) -> dict[str, Any]:
    from pipeline.codec import decode_stage, encode_stage

    nbytes = x.nbytes
    wire = encode_stage(msg)
    wire16 = encode_stage(msg, float16=True)
    encode, decode = _timings([lambda: encode_stage(msg), lambda: decode_stage(wire)], repeats)
    codec, memcpy = _timings([lambda: decode_stage(encode_stage(msg)), x.copy], repeats)
    codec16, _ = _timings([lambda: decode_stage(encode_stage(msg, float16=True)), x.copy], repeats)
    c_med, c_p95 = _ms_per_mib(codec, nbytes)
    m_med, m_p95 = _ms_per_mib(memcpy, nbytes)
    h_med, h_p95 = _ms_per_mib(codec16, nbytes)
    return {
        "bytes": nbytes,
        "wire_bytes": len(wire),
        "codec_us": statistics.median(codec) * 1e6,
        "encode_ms_per_MB": _ms_per_mib(encode, nbytes)[0],
        "decode_ms_per_MB": _ms_per_mib(decode, nbytes)[0],
        "codec_ms_per_MB": c_med,
        "codec_p95_ms_per_MB": c_p95,
        "memcpy_ms_per_MB": m_med,
        "memcpy_p95_ms_per_MB": m_p95,
        "ratio": c_med / m_med,
        "float16": {
            "wire_bytes": len(wire16),
            "codec_ms_per_MB": h_med,
            "codec_p95_ms_per_MB": h_p95,
            "ratio": h_med / m_med,
        },
    }


def run(args: argparse.Namespace) -> BenchReport:
    result = measure(args.sizes, args.repeats)
    return BenchReport(result, render(result), ())


def render(result: dict[str, Any]) -> str:
    keys = [
        "size",
        "wire_bytes",
        "codec_us",
        "encode_ms_per_MB",
        "decode_ms_per_MB",
        "codec_ms_per_MB",
        "codec_p95_ms_per_MB",
        "memcpy_ms_per_MB",
        "memcpy_p95_ms_per_MB",
        "ratio",
    ]
    f16_keys = ["wire_bytes", "codec_ms_per_MB", "ratio"]
    rows = [[r[k] for k in keys] + [r["float16"][k] for k in f16_keys] for r in result["sizes"]]
    return "\n".join(
        [
            f"msgpack stage codec vs memcpy, ms per MiB of float32 tensor, median (and p95) of "
            f"{result['repeats']} runs",
            format_table(
                [
                    "size",
                    "wire B",
                    "us/msg",
                    "enc",
                    "dec",
                    "enc+dec",
                    "p95",
                    "memcpy",
                    "p95",
                    "codec/memcpy",
                    "f16 wire B",
                    "f16 enc+dec",
                    "f16/memcpy",
                ],
                rows,
            ),
        ]
    )
