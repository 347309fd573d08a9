"""The benchmarks' arithmetic (benchmarks/stats.py): percentiles, playback underruns,
packet cutting, Prometheus histogram deltas and the tables. No model, no server."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks import stats


def test_percentile_matches_numpy_linear_interpolation() -> None:
    rng = np.random.default_rng(3)
    for n in (1, 2, 5, 17):
        xs = list(rng.exponential(100, n))
        for q in (0, 1, 50, 90, 99, 100):
            assert stats.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert math.isnan(stats.percentile([], 50))
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)


def test_summary() -> None:
    s = stats.summary([3.0, 1.0, 2.0])
    assert (s["n"], s["min"], s["p50"], s["max"], s["mean"]) == (3, 1.0, 2.0, 3.0, 2.0)
    assert math.isnan(stats.summary([])["p99"])


def test_playout_no_underrun_when_packets_keep_ahead() -> None:
    # 80 ms packets arriving every 40 ms: the queue only grows.
    arrivals = [0.04 * i for i in range(10)]
    po = stats.playout(arrivals, [0.08] * 10)
    assert (po.underruns, po.stall_s) == (0, 0.0)
    assert po.end_s == pytest.approx(0.8)


def test_playout_counts_late_packets_and_stall_time() -> None:
    # First packet at 1.0 s plays until 1.08; the second comes at 1.10 (20 ms stall), the third
    # is on time (1.18 < 1.10 + 0.08 = 1.18: exactly on the boundary is no underrun), the
    # fourth comes 100 ms after the audio ran out at 1.26.
    arrivals = [1.00, 1.10, 1.18, 1.36]
    po = stats.playout(arrivals, [0.08] * 4)
    assert po.underruns == 2
    assert po.stall_s == pytest.approx(0.02 + 0.10)
    assert po.end_s == pytest.approx(1.44)


def test_playout_burst_after_stall_does_not_count_twice() -> None:
    arrivals = [0.0, 0.5, 0.5, 0.5]
    po = stats.playout(arrivals, [0.08] * 4)
    assert po.underruns == 1
    assert po.stall_s == pytest.approx(0.42)
    assert stats.playout([], []).underruns == 0
    with pytest.raises(ValueError):
        stats.playout([0.0], [])


def test_gaps_and_shifted() -> None:
    assert stats.gaps([0.0, 0.1, 0.3]) == pytest.approx([0.1, 0.2])
    # A serial pipeline: every extra cost delays its own packet and all later ones.
    assert stats.shifted([0.0, 0.1, 0.2], [0.5, 0.0, 0.25]) == pytest.approx([0.5, 0.6, 0.95])


def test_packet_bounds() -> None:
    assert stats.packet_bounds(5) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert stats.packet_bounds(10, 2, 4) == [(0, 2), (2, 6), (6, 10)]
    assert stats.packet_bounds(7, 4, 4) == [(0, 4), (4, 7)]
    assert stats.packet_bounds(0) == []
    with pytest.raises(ValueError):
        stats.packet_bounds(3, 0, 1)


def _scrape(count: float, total: float, buckets: dict[str, float]) -> dict:
    lab = {"api": "tts"}
    return {
        "h_bucket": [({**lab, "le": le}, v) for le, v in buckets.items()],
        "h_count": [(lab, count)],
        "h_sum": [(lab, total)],
    }


def test_histogram_delta_and_quantiles() -> None:
    before = _scrape(2, 0.1, {"0.05": 2, "0.1": 2, "0.2": 2, "+Inf": 2})
    after = _scrape(6, 0.6, {"0.05": 2, "0.1": 4, "0.2": 6, "+Inf": 6})
    d = stats.histogram_delta(before, after, "h")["api=tts"]
    assert d["count"] == 4 and d["sum"] == pytest.approx(0.5)
    assert d["buckets"] == [[0.05, 0], [0.1, 2], [0.2, 4], [math.inf, 4]]
    # rank 2 of 4 falls at the top of the (0.05, 0.1] bucket; rank 3.6 at 80% into (0.1, 0.2].
    assert d["p50"] == pytest.approx(0.1)
    assert d["p90"] == pytest.approx(0.18)
    # Nothing new between two scrapes: no entry.
    assert stats.histogram_delta(after, after, "h") == {}


def test_bucket_quantile_in_inf_bucket_returns_last_bound() -> None:
    assert stats.bucket_quantile([(0.1, 1), (math.inf, 10)], 0.99) == 0.1
    assert math.isnan(stats.bucket_quantile([], 0.5))


def test_tables_render_levels_and_ratios() -> None:
    s = stats.summary([100.0, 200.0])
    level = {
        "concurrency": 4,
        "utterances": 2,
        "first_packet_ms": s,
        "server_first_packet_ms": s,
        "gap_ms": s,
        "rtf_compute": stats.summary([0.5]),
        "rtf_wall": stats.summary([0.75]),
        "underruns": 3,
        "streams_with_underruns": 1,
        "stall_ms": stats.summary([]),
    }
    table = stats.concurrency_table([level]).splitlines()
    assert len(table) == 3
    assert table[2] == "| 4 | 2 | 150 / 190 / 199 | 150 | 150 / 199 | 0.500 | 0.750 | 3 (1/2) | n/a / n/a |"
    rows = [
        {"what": "(a)", "first_packet_ms": s, "rtf": stats.summary([0.5])},
        {
            "what": "(b)",
            "first_packet_ms": s,
            "rtf": stats.summary([1.0]),
            "ratio_first_packet": 1.0,
            "ratio_rtf": 2.0,
        },
    ]
    cmp = stats.comparison_table(rows).splitlines()
    assert cmp[2].endswith("| n/a | n/a |") and cmp[3].endswith("| 1.00 | 2.00 |")
    assert stats.ratio(3.0, 2.0) == 1.5 and math.isnan(stats.ratio(1.0, 0.0))
    assert math.isnan(stats.ratio(math.nan, 1.0))
