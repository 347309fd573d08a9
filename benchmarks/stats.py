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


# ---------------------------------------------------------------------- packet policies


def packet_frames(samples: Sequence[int], samples_per_frame: int) -> list[float]:
    """Frames (80 ms each) per packet, from the samples each packet carried."""
    return [n / samples_per_frame for n in samples]


def observed_bounds(
    offsets: Sequence[int], samples: Sequence[int], samples_per_frame: int
) -> list[tuple[int, int]] | None:
    """The frame ranges ``[start, end)`` of the packets an utterance arrived in, from each
    packet's ``sample_offset`` and length; None unless they are whole frames, in order and
    without a hole from frame 0 (what the engine sends at the model's rate)."""
    if len(offsets) != len(samples) or not offsets:
        return None
    out: list[tuple[int, int]] = []
    at = 0
    for o, n in zip(offsets, samples):
        if o != at or o % samples_per_frame or n % samples_per_frame or n <= 0:
            return None
        out.append((o // samples_per_frame, (o + n) // samples_per_frame))
        at = o + n
    return out


def counter_delta(before: Mapping[str, Any], after: Mapping[str, Any], name: str) -> float:
    """What counter sample ``name`` (e.g. ``x_total``) counted between two scrapes, summed
    over its label sets; NaN when the second scrape does not have it."""
    if name not in after:
        return math.nan
    return sum(v for _, v in after[name]) - sum(v for _, v in before.get(name, []))


def decoder_cost(
    before: Mapping[str, Any], after: Mapping[str, Any], prefix: str = "qwen3tts_"
) -> dict[str, float]:
    """The codec decoder's work between two scrapes, from the server's counters
    ``<prefix>decoder_seconds_total``, ``decoded_frames_total`` and ``decoder_calls_total``:
    seconds, frames, calls, ms per decoded frame and frames per call (NaN where missing)."""
    secs = counter_delta(before, after, prefix + "decoder_seconds_total")
    frames = counter_delta(before, after, prefix + "decoded_frames_total")
    calls = counter_delta(before, after, prefix + "decoder_calls_total")
    return {
        "seconds": secs,
        "frames": frames,
        "calls": calls,
        "ms_per_frame": 1000 * secs / frames if frames > 0 else math.nan,
        "frames_per_call": frames / calls if calls > 0 else math.nan,
    }


def policy_table(levels: Sequence[Mapping[str, Any]]) -> str:
    """One row per (packet policy, concurrency) of one text pace: ``levels`` are level
    summaries (``benchmarks.concurrency.level_summary``) with a ``policy`` key."""
    head = (
        "| policy | concurrency | utterances | first packet p50 / p90 / p99 (ms) | RTF compute p50 "
        "| RTF wall p50 | underruns (streams with any) | stall per utterance p50 / max (ms) "
        "| packets per utterance p50 | frames per packet, mean (client / server) "
        "| decoder ms per frame | frames per decoder call |"
    )
    rows = [head, "|" + "---|" * 12]
    for lv in levels:
        fp, dec = lv["first_packet_ms"], lv.get("decoder") or {}
        srv = lv.get("server_packet_frames_mean", math.nan)
        rows.append(
            f"| {lv['policy']} | {lv['concurrency']} | {lv['utterances']} "
            f"| {fmt(fp['p50'])} / {fmt(fp['p90'])} / {fmt(fp['p99'])} "
            f"| {fmt(lv['rtf_compute']['p50'], 3)} | {fmt(lv['rtf_wall']['p50'], 3)} "
            f"| {lv['underruns']} ({lv['streams_with_underruns']}/{lv['utterances']}) "
            f"| {fmt(lv['stall_ms']['p50'])} / {fmt(lv['stall_ms']['max'])} "
            f"| {fmt(lv.get('packets_per_utterance', {}).get('p50', math.nan), 1)} "
            f"| {fmt(lv.get('frames_per_packet_mean', math.nan), 2)} / {fmt(srv, 2)} "
            f"| {fmt(dec.get('ms_per_frame', math.nan), 2)} | {fmt(dec.get('frames_per_call', math.nan), 2)} |"
        )
    return "\n".join(rows)


def policy_ratio_rows(levels: Sequence[Mapping[str, Any]], reference: str) -> list[dict[str, Any]]:
    """Per concurrency level, every other policy against ``reference`` (same text pace):
    ratios of compute RTF p50, first packet p50 and p99, decoder ms per frame, and both
    underrun counts. ``levels`` carry a ``policy`` key."""
    ref = {lv["concurrency"]: lv for lv in levels if lv["policy"] == reference}
    out = []
    for lv in levels:
        r = ref.get(lv["concurrency"])
        if lv["policy"] == reference or r is None:
            continue

        def p(x: Mapping[str, Any], key: str, q: str = "p50") -> float:
            return float(x[key][q])

        out.append(
            {
                "concurrency": lv["concurrency"],
                "policy": lv["policy"],
                "reference": reference,
                "ratio_rtf_compute": ratio(p(lv, "rtf_compute"), p(r, "rtf_compute")),
                "ratio_first_packet_p50": ratio(p(lv, "first_packet_ms"), p(r, "first_packet_ms")),
                "ratio_first_packet_p99": ratio(
                    p(lv, "first_packet_ms", "p99"), p(r, "first_packet_ms", "p99")
                ),
                "ratio_decoder_ms_per_frame": ratio(
                    (lv.get("decoder") or {}).get("ms_per_frame", math.nan),
                    (r.get("decoder") or {}).get("ms_per_frame", math.nan),
                ),
                "underruns": [lv["underruns"], lv["streams_with_underruns"], lv["utterances"]],
                "reference_underruns": [r["underruns"], r["streams_with_underruns"], r["utterances"]],
                "stall_ms_p50": [p(lv, "stall_ms"), p(r, "stall_ms")],
            }
        )
    return out


def policy_ratio_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The markdown of ``policy_ratio_rows``."""
    out = [
        "| concurrency | policy / reference | RTF compute p50 | first packet p50 | first packet p99 "
        "| decoder ms per frame | underruns (streams with any): policy / reference "
        "| stall p50 (ms): policy / reference |",
        "|" + "---|" * 8,
    ]
    for r in rows:
        u, ru, st = r["underruns"], r["reference_underruns"], r["stall_ms_p50"]
        out.append(
            f"| {r['concurrency']} | {r['policy']} / {r['reference']} | {fmt(r['ratio_rtf_compute'], 2)} "
            f"| {fmt(r['ratio_first_packet_p50'], 2)} | {fmt(r['ratio_first_packet_p99'], 2)} "
            f"| {fmt(r['ratio_decoder_ms_per_frame'], 2)} "
            f"| {u[0]} ({u[1]}/{u[2]}) / {ru[0]} ({ru[1]}/{ru[2]}) | {fmt(st[0])} / {fmt(st[1])} |"
        )
    return "\n".join(out)


def pace_table(cells: Sequence[Mapping[str, Any]], paces: Sequence[str]) -> str:
    """Underruns per (policy, concurrency) at each text pace: ``cells`` of ``{"policy",
    "concurrency", "pace", "underruns", "streams_with_underruns", "utterances", "stall_ms"
    (summary), "first_packet_ms" (summary)}``; ``paces`` the pace labels, in column order."""
    head = "| policy | concurrency | " + " | ".join(
        f"{p}: underruns (streams) / stall p50, max (ms) / first packet p50 (ms)" for p in paces
    )
    out = [head + " |", "|" + "---|" * (2 + len(paces))]
    keys = list(dict.fromkeys((c["policy"], c["concurrency"]) for c in cells))
    by = {(c["policy"], c["concurrency"], c["pace"]): c for c in cells}
    for pol, n in keys:
        row = f"| {pol} | {n} |"
        for p in paces:
            c = by.get((pol, n, p))
            if c is None:
                row += " n/a |"
                continue
            row += (
                f" {c['underruns']} ({c['streams_with_underruns']}/{c['utterances']}) / "
                f"{fmt(c['stall_ms']['p50'])}, {fmt(c['stall_ms']['max'])} / {fmt(c['first_packet_ms']['p50'])} |"
            )
        out.append(row)
    return "\n".join(out)
