"""PNG plots of a concurrency benchmark result (matplotlib, Agg backend):

* ``first_packet_hist.png`` — first-packet latency histogram per concurrency (one line style
  per packet policy; the main text pace);
* ``first_packet_cdf.png`` — its empirical CDF per concurrency and policy;
* ``rtf_vs_concurrency.png`` — real-time factor (p50, min..p90 band) against concurrency per
  policy, with the official package and the peers' decode at concurrency 1;
* ``packets_vs_concurrency.png`` — frames per packet and the decoder's ms per decoded frame
  against concurrency, per policy and text pace.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

STYLES = ("-", "--", ":", "-.")
POLICY_COLORS = ("tab:blue", "tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:pink")


def _first_packets(level: dict[str, Any]) -> list[float]:
    return [u["first_packet_ms"] for u in level.get("utterances_raw", []) if u.get("ok")]


def _title(result: dict[str, Any], what: str) -> str:
    c = result["conditions"]
    return f"{what}\n{result['preset']}, {c['device']}, {c['dtype']}, {c['date_utc'][:10]}"


def _pace(rate: float) -> str:
    return "all at once" if rate == 0 else f"{rate:g} tokens/s"


def _sweeps(result: dict[str, Any]) -> list[dict[str, Any]]:
    from benchmarks.concurrency import sweeps_of

    return [
        {**sw, "levels": [lv for lv in sw["levels"] if lv["utterances"]]}
        for sw in sweeps_of(result)
        if any(lv["utterances"] for lv in sw["levels"])
    ]


def write_plots(result: dict[str, Any], out: Path) -> list[Path]:
    sweeps = _sweeps(result)
    if not sweeps:
        return []
    main_rate = sweeps[0]["tokens_per_second"]
    main = [sw for sw in sweeps if sw["tokens_per_second"] == main_rate]
    multi = len(main) > 1
    style = {sw["policy"]: STYLES[i % len(STYLES)] for i, sw in enumerate(main)}
    ns_all = sorted({lv["concurrency"] for sw in main for lv in sw["levels"]})
    cmap = plt.get_cmap("viridis")
    colors = {n: cmap(i / max(len(ns_all) - 1, 1)) for i, n in enumerate(ns_all)}
    pace_note = f" (text at {_pace(main_rate)})"
    paths = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    allv = [v for sw in main for lv in sw["levels"] for v in _first_packets(lv)]
    if allv:
        bins = [float(b) for b in np.linspace(0, max(allv) * 1.05, 40)]
        for sw in main:
            for lv in sw["levels"]:
                ax.hist(
                    _first_packets(lv),
                    bins=bins,
                    histtype="step",
                    linewidth=1.6,
                    linestyle=style[sw["policy"]],
                    color=colors[lv["concurrency"]],
                    label=(f"{sw['policy']} " if multi else "")
                    + f"N={lv['concurrency']} ({lv['utterances']})",
                )
    ax.set_xlabel("first-packet latency (ms): first text delta sent -> first audio received")
    ax.set_ylabel("utterances")
    ax.set_title(_title(result, "First-packet latency by concurrency" + pace_note))
    ax.legend(title=("policy, " if multi else "") + "concurrency (utterances)", fontsize=7)
    fig.tight_layout()
    paths.append(out / "first_packet_hist.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for sw in main:
        for lv in sw["levels"]:
            xs = np.sort(_first_packets(lv))
            if not len(xs):
                continue
            ys = np.arange(1, len(xs) + 1) / len(xs)
            xs, ys = np.concatenate([xs[:1], xs]), np.concatenate([[0.0], ys])
            ax.step(
                xs,
                ys,
                where="post",
                linestyle=style[sw["policy"]],
                color=colors[lv["concurrency"]],
                label=(f"{sw['policy']} " if multi else "") + f"N={lv['concurrency']}",
            )
    ax.set_xlabel("first-packet latency (ms)")
    ax.set_ylabel("fraction of utterances")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(_title(result, "First-packet latency CDF" + pace_note))
    ax.legend(title=("policy, " if multi else "") + "concurrency", fontsize=7)
    fig.tight_layout()
    paths.append(out / "first_packet_cdf.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(11, 4.5))
    tops = [1.0]
    for i, sw in enumerate(main):
        levels = sw["levels"]
        ns = [lv["concurrency"] for lv in levels]
        prefix = f"(a) {sw['policy']}" if multi else "(a)"
        for key, label, color in (
            ("rtf_compute", f"{prefix} compute RTF (server)", "tab:blue"),
            ("rtf_wall", f"{prefix} wall: first delta sent -> last audio received, / audio", "tab:green"),
        ):
            if multi:
                color = POLICY_COLORS[i % len(POLICY_COLORS)]
            p50 = [lv[key]["p50"] for lv in levels]
            ls = "-" if key == "rtf_compute" else "--"
            ax.plot(ns, p50, marker="o", linestyle=ls, color=color, label=label + ", p50")
            ax.fill_between(
                ns,
                [lv[key]["min"] for lv in levels],
                [lv[key]["p90"] for lv in levels],
                color=color,
                alpha=0.12,
            )
            tops += [lv[key]["p90"] for lv in levels]
    for row, marker, color in zip(result.get("comparison", [])[1:], ("s", "^"), ("tab:red", "tab:orange")):
        ax.scatter(
            [ns_all[0]],
            [row["rtf"]["p50"]],
            marker=marker,
            s=70,
            color=color,
            zorder=3,
            label=row["what"]
            + (f" ({main[0]['policy']})" if multi and row["what"].startswith("(c)") else "")
            + ", p50",
        )
        tops.append(row["rtf"]["p50"])
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="real time")
    finite = [t for t in tops if isinstance(t, (int, float)) and math.isfinite(t)]
    ax.set_ylim(0, 1.1 * max(finite))
    if len(ns_all) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ns_all, [str(n) for n in ns_all])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("real-time factor (lower is faster)")
    ax.set_title(_title(result, "Real-time factor vs concurrency (band: min..p90)" + pace_note))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "rtf_vs_concurrency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    policies = list(dict.fromkeys(sw["policy"] for sw in sweeps))
    rates = list(dict.fromkeys(sw["tokens_per_second"] for sw in sweeps))
    any_decoder = False
    for sw in sweeps:
        color = POLICY_COLORS[policies.index(sw["policy"]) % len(POLICY_COLORS)]
        ls = STYLES[rates.index(sw["tokens_per_second"]) % len(STYLES)]
        label = f"{sw['policy']}, {_pace(sw['tokens_per_second'])}"
        ns = [lv["concurrency"] for lv in sw["levels"]]
        fpp = [lv.get("frames_per_packet_mean", math.nan) for lv in sw["levels"]]
        ax1.plot(ns, fpp, marker="o", linestyle=ls, color=color, label=label)
        ms = [(lv.get("decoder") or {}).get("ms_per_frame", math.nan) for lv in sw["levels"]]
        if any(math.isfinite(x) for x in ms):
            any_decoder = True
            ax2.plot(ns, ms, marker="o", linestyle=ls, color=color, label=label)
    for ax in (ax1, ax2):
        if len(ns_all) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(ns_all, [str(n) for n in ns_all])
        ax.set_xlabel("concurrent streams")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("frames per packet, mean (client side)")
    ax1.set_ylim(bottom=0)
    ax1.legend(fontsize=7)
    ax2.set_ylabel("decoder ms per decoded frame (server counters)")
    if any_decoder:
        ax2.set_ylim(bottom=0)
        ax2.legend(fontsize=7)
    else:
        ax2.text(
            0.5, 0.5, "this server has no decoder counters", ha="center", va="center", transform=ax2.transAxes
        )
    fig.suptitle(_title(result, "Packets and decoder cost vs concurrency"))
    fig.tight_layout()
    paths.append(out / "packets_vs_concurrency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
