"""PNG plots of a concurrency benchmark result (matplotlib, Agg backend):

* ``first_packet_hist.png`` — first-packet latency histogram per concurrency;
* ``first_packet_cdf.png`` — its empirical CDF per concurrency;
* ``rtf_vs_concurrency.png`` — real-time factor (p50, p90 band) against concurrency, with
  the official package and the peers' decode at concurrency 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def _first_packets(level: dict[str, Any]) -> list[float]:
    return [u["first_packet_ms"] for u in level["utterances_raw"] if u.get("ok")]


def _title(result: dict[str, Any], what: str) -> str:
    c = result["conditions"]
    return f"{what}\n{result['preset']}, {c['device']}, {c['dtype']}, {c['date_utc'][:10]}"


def write_plots(result: dict[str, Any], out: Path) -> list[Path]:
    levels = [lv for lv in result["levels"] if lv["utterances"]]
    if not levels:
        return []
    cmap = plt.get_cmap("viridis")
    colors = {lv["concurrency"]: cmap(i / max(len(levels) - 1, 1)) for i, lv in enumerate(levels)}
    paths = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    allv = [v for lv in levels for v in _first_packets(lv)]
    bins = [float(b) for b in np.linspace(0, max(allv) * 1.05, 40)]
    for lv in levels:
        ax.hist(
            _first_packets(lv),
            bins=bins,
            histtype="step",
            linewidth=1.6,
            color=colors[lv["concurrency"]],
            label=f"N={lv['concurrency']} ({lv['utterances']})",
        )
    ax.set_xlabel("first-packet latency (ms): first text delta sent -> first audio received")
    ax.set_ylabel("utterances")
    ax.set_title(_title(result, "First-packet latency by concurrency"))
    ax.legend(title="concurrency (utterances)")
    fig.tight_layout()
    paths.append(out / "first_packet_hist.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for lv in levels:
        xs = np.sort(_first_packets(lv))
        ys = np.arange(1, len(xs) + 1) / len(xs)
        xs, ys = np.concatenate([xs[:1], xs]), np.concatenate([[0.0], ys])
        ax.step(xs, ys, where="post", color=colors[lv["concurrency"]], label=f"N={lv['concurrency']}")
    ax.set_xlabel("first-packet latency (ms)")
    ax.set_ylabel("fraction of utterances")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(_title(result, "First-packet latency CDF"))
    ax.legend(title="concurrency")
    fig.tight_layout()
    paths.append(out / "first_packet_cdf.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(11, 4.5))
    ns = [lv["concurrency"] for lv in levels]
    for key, label, color in (
        ("rtf_compute", "(a) compute RTF (server)", "tab:blue"),
        ("rtf_wall", "(a) wall: first delta sent -> last audio received, / audio", "tab:green"),
    ):
        p50 = [lv[key]["p50"] for lv in levels]
        ax.plot(ns, p50, marker="o", color=color, label=label + ", p50")
        ax.fill_between(
            ns, [lv[key]["min"] for lv in levels], [lv[key]["p90"] for lv in levels], color=color, alpha=0.15
        )
    tops = [lv["rtf_compute"]["p90"] for lv in levels] + [lv["rtf_wall"]["p90"] for lv in levels] + [1.0]
    for row, marker, color in zip(result.get("comparison", [])[1:], ("s", "^"), ("tab:red", "tab:orange")):
        ax.scatter(
            [ns[0]],
            [row["rtf"]["p50"]],
            marker=marker,
            s=70,
            color=color,
            zorder=3,
            label=row["what"] + ", p50",
        )
        tops.append(row["rtf"]["p50"])
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="real time")
    ax.set_ylim(0, 1.1 * max(t for t in tops if t == t))
    if len(ns) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("real-time factor (lower is faster)")
    ax.set_title(_title(result, "Real-time factor vs concurrency (band: min..p90)"))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "rtf_vs_concurrency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
