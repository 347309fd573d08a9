"""Pure arithmetic of the benchmarks: percentiles, playback underruns, Prometheus
histogram deltas and the markdown table. No I/O, no model: tested in tests/test_bench_logic.py."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def percentile(xs: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics
    (numpy's default); NaN for no data."""
    if not xs:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(xs: Sequence[float]) -> dict[str, float]:
    """n, mean, min, p50, p90, p99, max of ``xs`` (NaN where there is no data)."""
    return {
        "n": len(xs),
        "mean": (sum(xs) / len(xs)) if xs else math.nan,
        "min": min(xs) if xs else math.nan,
        "p50": percentile(xs, 50),
        "p90": percentile(xs, 90),
        "p99": percentile(xs, 99),
        "max": max(xs) if xs else math.nan,
    }


@dataclass(frozen=True)
class Playout:
    underruns: int  # packets that arrived after the audio before them had finished playing
    stall_s: float  # total time the listener heard nothing between the first and last packet
    end_s: float  # when the last sample finished playing (same clock as the arrivals)


def playout(arrivals: Sequence[float], durations: Sequence[float]) -> Playout:
    """Playback of packets that arrive at ``arrivals`` (seconds, any clock, non-decreasing)
    holding ``durations`` seconds of audio each. Playback starts when the first packet
    arrives; the playout clock advances by each packet's duration. A later packet that
    arrives after the queued audio has run dry is an underrun: playback stalls until it
    arrives (the stall is counted) and resumes from there."""
    if len(arrivals) != len(durations):
        raise ValueError("one duration per arrival")
    if not arrivals:
        return Playout(0, 0.0, math.nan)
    end = arrivals[0] + durations[0]
    count, stall = 0, 0.0
    for t, d in zip(arrivals[1:], durations[1:]):
        if t > end:
            count += 1
            stall += t - end
            end = t
        end += d
    return Playout(count, stall, end)


def gaps(arrivals: Sequence[float]) -> list[float]:
    """Times between consecutive arrivals."""
    return [b - a for a, b in itertools.pairwise(arrivals)]


def shifted(arrivals: Sequence[float], extra: Sequence[float]) -> list[float]:
    """Arrivals of a serial pipeline that spends ``extra[i]`` more seconds before packet
    ``i`` (and so before every later one): ``arrivals[i] + sum(extra[: i + 1])``."""
    if len(arrivals) != len(extra):
        raise ValueError("one extra cost per arrival")
    out, acc = [], 0.0
    for t, e in zip(arrivals, extra):
        acc += e
        out.append(t + acc)
    return out


def packet_bounds(frames: int, first_packet_frames: int = 1, packet_frames: int = 1) -> list[tuple[int, int]]:
    """Frame ranges ``[start, end)`` of the packets of an utterance of ``frames`` frames,
    cut as the engine cuts them (the last packet may be short)."""
    if first_packet_frames < 1 or packet_frames < 1:
        raise ValueError("packets hold at least one frame")
    out: list[tuple[int, int]] = []
    start = 0
    while start < frames:
        end = min(frames, start + (first_packet_frames if not out else packet_frames))
        out.append((start, end))
        start = end
    return out


# ---------------------------------------------------------------------- Prometheus


Labels = tuple[tuple[str, str], ...]


def histogram_delta(before: Mapping[str, Any], after: Mapping[str, Any], name: str) -> dict[str, Any]:
    """What histogram ``name`` recorded between two scrapes, per label set.

    ``before``/``after`` map a sample name (``<name>_bucket``, ``_count``, ``_sum``) to a
    list of ``(labels dict, value)``. Returns ``{label string: {"count", "sum",
    "buckets": [[le, cumulative count], ...], "p50", "p90", "p99"}}``, the quantiles
    estimated from the buckets as Prometheus' ``histogram_quantile`` does."""

    def index(samples: Mapping[str, Any], suffix: str) -> dict[Labels, dict[str, float]]:
        out: dict[Labels, dict[str, float]] = {}
        for labels, value in samples.get(name + suffix, []):
            rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
            out.setdefault(rest, {})[labels.get("le", "")] = float(value)
        return out

    result: dict[str, Any] = {}
    b_buckets, a_buckets = index(before, "_bucket"), index(after, "_bucket")
    b_count, a_count = index(before, "_count"), index(after, "_count")
    b_sum, a_sum = index(before, "_sum"), index(after, "_sum")
    for key, buckets in a_buckets.items():
        old = b_buckets.get(key, {})
        cum = sorted(((_le(le), v - old.get(le, 0.0)) for le, v in buckets.items()), key=lambda p: p[0])
        count = a_count.get(key, {}).get("", 0.0) - b_count.get(key, {}).get("", 0.0)
        total = a_sum.get(key, {}).get("", 0.0) - b_sum.get(key, {}).get("", 0.0)
        if count <= 0:
            continue
        label = ",".join(f"{k}={v}" for k, v in key) or "-"
        result[label] = {
            "count": count,
            "sum": total,
            "buckets": [[le, c] for le, c in cum],
            **{f"p{q}": bucket_quantile(cum, q / 100) for q in (50, 90, 99)},
        }
    return result


def _le(s: str) -> float:
    return math.inf if s in ("+Inf", "inf", "Inf") else float(s)


def bucket_quantile(cumulative: Sequence[tuple[float, float]], q: float) -> float:
    """Quantile ``q`` (0..1) from cumulative bucket counts ``[(upper bound, count), ...]``
    sorted by bound, interpolating linearly inside the bucket (Prometheus'
    ``histogram_quantile``; a quantile in the +Inf bucket returns the last finite bound)."""
    if not cumulative or cumulative[-1][1] <= 0:
        return math.nan
    rank = q * cumulative[-1][1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in cumulative:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


# ---------------------------------------------------------------------- tables


def fmt(x: float | None, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def concurrency_table(levels: Sequence[Mapping[str, Any]]) -> str:
    """The markdown table of a sweep: one row per concurrency level (see
    ``benchmarks.concurrency.level_summary`` for the keys)."""
    head = (
        "| concurrency | utterances | first packet p50 / p90 / p99 (ms) | server first packet p50 (ms) "
        "| inter-packet gap p50 / p99 (ms) | RTF compute p50 | RTF wall p50 | underruns (streams with any) "
        "| stall per utterance p50 / max (ms) |"
    )
    sep = "|" + "---|" * 9
    rows = [head, sep]
    for lv in levels:
        fp, gap = lv["first_packet_ms"], lv["gap_ms"]
        rows.append(
            f"| {lv['concurrency']} | {lv['utterances']} "
            f"| {fmt(fp['p50'])} / {fmt(fp['p90'])} / {fmt(fp['p99'])} "
            f"| {fmt(lv['server_first_packet_ms']['p50'])} "
            f"| {fmt(gap['p50'])} / {fmt(gap['p99'])} "
            f"| {fmt(lv['rtf_compute']['p50'], 3)} | {fmt(lv['rtf_wall']['p50'], 3)} "
            f"| {lv['underruns']} ({lv['streams_with_underruns']}/{lv['utterances']}) "
            f"| {fmt(lv['stall_ms']['p50'])} / {fmt(lv['stall_ms']['max'])} |"
        )
    return "\n".join(rows)


def comparison_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Side by side at concurrency 1: ``rows`` of ``{"what", "first_packet_ms" (summary),
    "rtf" (summary), "ratio_first_packet", "ratio_rtf"}``."""
    out = [
        "| | first packet p50 (ms) | first packet min / max (ms) | RTF p50 | first packet / (a) | RTF / (a) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        fp, rtf = r["first_packet_ms"], r["rtf"]
        out.append(
            f"| {r['what']} | {fmt(fp['p50'])} | {fmt(fp['min'])} / {fmt(fp['max'])} | {fmt(rtf['p50'], 3)} "
            f"| {fmt(r.get('ratio_first_packet'), 2)} | {fmt(r.get('ratio_rtf'), 2)} |"
        )
    return "\n".join(out)


def ratio(a: float, b: float) -> float:
    """``a / b``; NaN when either is missing or ``b`` is 0."""
    if any(math.isnan(x) for x in (a, b)) or b == 0:
        return math.nan
    return a / b
