"""Ray Serve overhead: first-packet latency and inter-packet gaps of the same streams
through Ray's gRPC proxy (and, with ``--direct-ingress``, the replica's own port, Ray's
direct ingress) versus the direct ``qwen3tts-rt serve`` process, at concurrency 1 and 8,
in one run on one machine.

Both sides run the same checkpoint with the same settings: the direct server as a
subprocess, the Ray application as one replica on a local Ray cluster. Both stay up; the
paths take turns level by level and round by round (``--repeats``), so that load from
other work on the machine falls on all of them alike. The clients are the concurrency
benchmark's (``benchmarks/load.py``): LLM-paced text deltas, one channel per client.
Writes ``result.json``, ``README.md`` and ``ray_overhead.png`` to
``benchmarks/results/ray-<device>-<preset>-<date>/``.

    python -m benchmarks.ray_bench --preset tiny --direct-ingress     # make ray-bench
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import torch

from benchmarks import stats
from benchmarks.concurrency import (
    ROOT,
    ServerProcess,
    ensure_checkpoint,
    git_commit,
    level_summary,
    loadavg,
    reference_audio,
    utterance_figures,
    wav_bytes,
)
from benchmarks.load import SENTENCES, run_level, token_deltas
from qwen3tts_rt.model.text_tokenizer import TextTokenizer
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"max_new_tokens": 40, "rounds": 3},
    "0.6b": {"max_new_tokens": 40, "rounds": 2},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _create_voice(address: str, ref_wav: bytes, metadata: Any = ()) -> str:
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.TextToSpeechStub(ch)
        req = pb.CreateVoiceRequest(ref_audio=ref_wav, x_vector_only=True, display_name="bench")
        return str(stub.CreateVoice(req, metadata=metadata, timeout=600).voice_id)


def _config(voice_id: str, a: argparse.Namespace) -> pb.StreamConfig:
    return pb.StreamConfig(
        voice_id=voice_id,
        first_packet_frames=a.first_packet_frames,
        packet_frames=a.packet_frames,
        sampling=pb.SamplingParams(greedy=True, max_new_tokens=a.max_new_tokens),
    )


def _measure(
    address: str, voice_id: str, n: int, a: argparse.Namespace, sentences: list[tuple[str, list[str]]]
) -> tuple[list[dict[str, Any]], float, list[str]]:
    """``n`` clients at once, ``a.rounds`` utterances each: (figures per utterance, wall s, errors)."""
    plan = [[sentences[(i + r) % len(sentences)] for r in range(a.rounds)] for i in range(n)]
    t0 = time.perf_counter()
    recs = asyncio.run(run_level(address, _config(voice_id, a), plan, a.tokens_per_second))
    return [utterance_figures(r) for r in recs], time.perf_counter() - t0, [r.error for r in recs if r.error]


def _interleave(
    a: argparse.Namespace, addresses: dict[str, tuple[str, str]], sentences: list[tuple[str, list[str]]]
) -> dict[tuple[str, int], tuple[list[dict[str, Any]], float, list[str]]]:
    """Every (path, level) ``a.repeats`` times, the paths taking turns; one warm-up each."""
    for address, voice in addresses.values():
        _measure(address, voice, 1, argparse.Namespace(**{**vars(a), "rounds": 1}), sentences)
    out: dict[tuple[str, int], tuple[list[dict[str, Any]], float, list[str]]] = {}
    for rep in range(a.repeats):
        for n in a.levels:
            for name, (address, voice) in addresses.items():
                figs, wall, errors = _measure(address, voice, n, a, sentences)
                old = out.get((name, n), ([], 0.0, []))
                out[(name, n)] = (old[0] + figs, old[1] + wall, old[2] + errors)
                ok = [f for f in figs if f["ok"]]
                fp = stats.percentile([f["first_packet_ms"] for f in ok], 50)
                gp = stats.percentile([g for f in ok for g in f["gaps_ms"]], 50)
                print(
                    f"  round {rep + 1} c={n} {name}: first packet p50 {fp:.1f} ms, gap p50 {gp:.1f} ms",
                    flush=True,
                )
    return out


def _server_args(a: argparse.Namespace, model: Path) -> dict[str, Any]:
    return {
        "model": str(model),
        "device": a.device,
        "dtype": a.dtype,
        "max_sessions": max(a.levels),
        "torch_threads": a.threads,
        "first_packet_frames": a.first_packet_frames,
        "packet_frames": a.packet_frames,
    }


def start_direct(a: argparse.Namespace, model: Path, logs: Path) -> ServerProcess:
    s = _server_args(a, model)
    args = ["--model", s["model"], "--device", s["device"], "--dtype", s["dtype"]]
    args += ["--max-sessions", str(s["max_sessions"]), "--torch-threads", str(s["torch_threads"])]
    args += ["--voices-dir", str(logs / "voices-direct")]
    args += ["--first-packet-frames", str(a.first_packet_frames), "--packet-frames", str(a.packet_frames)]
    return ServerProcess(args, (logs / "direct-server.log").open("w"))


def start_ray(a: argparse.Namespace, model: Path, logs: Path) -> dict[str, Any]:
    """One replica behind the proxy on a local Ray cluster; with ``--direct-ingress`` the
    same replica's own gRPC port too. Returns {"proxy": address, "direct_ingress": address
    or None, "replica_start_s": ...}."""
    di_port = _free_port()
    if a.direct_ingress:  # read by Ray's processes at start: set before ray.init
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
        os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"] = str(di_port)
        os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"] = str(di_port + 20)
        http = _free_port()
        os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(http)
        os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(http + 20)
    import ray
    from ray import serve

    from qwen3tts_rt.server.ray_app import APP_NAME, RayAppConfig, build_app, grpc_options

    ray.init(
        num_cpus=a.ray_cpus,
        include_dashboard=False,
        object_store_memory=256 * 2**20,
        log_to_driver=False,
        _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"),
    )
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()}, grpc_options=grpc_options(port))
    settings = _server_args(a, model)
    settings.update(
        num_gpus=1 if a.device.startswith("cuda") else 0,
        num_cpus=a.replica_cpus,
        num_replicas=1,
        voices_dir=str(logs / "voices-ray"),
        warmup=True,
    )
    t0 = time.monotonic()
    serve.run(build_app(config=RayAppConfig.from_args(settings)), name=APP_NAME, route_prefix=f"/{APP_NAME}")
    out: dict[str, Any] = {"replica_start_s": time.monotonic() - t0, "proxy": f"127.0.0.1:{port}"}
    out["direct_ingress"] = _direct_ingress_address(di_port) if a.direct_ingress else None
    if a.direct_ingress and out["direct_ingress"] is None:
        out["direct_ingress_error"] = f"no replica gRPC port in {di_port}..{di_port + 20}"
    return out


def stop_ray() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def _direct_ingress_address(first: int) -> str | None:
    """The replica's own gRPC port (Ray picks the first free one from ``first``)."""
    for port in range(first, first + 21):
        addr = f"127.0.0.1:{port}"
        with grpc.insecure_channel(addr) as ch:
            try:
                pb_grpc.TextToSpeechStub(ch).GetServerInfo(pb.GetServerInfoRequest(), timeout=2)
                return addr
            except grpc.RpcError:
                continue
    return None


# ---------------------------------------------------------------------- report


def _row(path: str, level: dict[str, Any]) -> str:
    fp, gap = level["first_packet_ms"], level["gap_ms"]
    return (
        f"| {path} | {level['concurrency']} | {level['utterances']} | {level['failed']} | "
        f"{stats.fmt(fp['p50'], 1)} | {stats.fmt(fp['p90'], 1)} | {stats.fmt(gap['p50'], 1)} | "
        f"{stats.fmt(gap['p90'], 1)} | {stats.fmt(gap['p99'], 1)} | {stats.fmt(gap['max'], 1)} | "
        f"{level['underruns']} |"
    )


def markdown(result: dict[str, Any]) -> str:
    c, s = result["conditions"], result["settings"]
    lines = [
        f"# Ray Serve overhead: {result['preset']} on {c['device']}",
        "",
        f"{c['date_utc']}, commit {c['git']['commit'][:10]}{' (dirty tree)' if c['git']['dirty'] else ''}; "
        f"{c['cpu_count']} CPUs, load average {c['loadavg_start']} at the start, {c['loadavg_end']} at "
        f"the end (other work shared the machine when it exceeds the CPU count). torch {c['torch']}, "
        f"{s['torch_threads']} thread(s); ray {c['ray']}. Greedy, max_new_tokens {s['max_new_tokens']}, "
        f"{s['rounds']} utterances per client and round, {s['repeats']} rounds, LLM-paced deltas at "
        f"{s['tokens_per_second']:g} tokens/s, packets of {s['first_packet_frames']} frame(s) then "
        f"{s['packet_frames']}.",
        "",
        "Direct: `qwen3tts-rt serve` (one process). Ray proxy: one replica of "
        "`qwen3tts_rt.server.ray_app` behind Ray Serve's gRPC proxy on a local Ray cluster"
        + (", and the same replica's direct ingress port" if "Ray direct ingress" in result["paths"] else "")
        + ". Same checkpoint, engine settings and texts; both servers up, used one at a time, the paths "
        "interleaved level by level and round by round (so that load from other work falls on all of them).",
        "",
        "| path | clients | utterances | failed | first packet p50 ms | p90 | gap p50 ms | p90 | p99 | max | underruns |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in s["concurrency"]:
        for name, levels in result["paths"].items():
            lines += [_row(name, lv) for lv in levels if lv["concurrency"] == n]
    lines += [
        "",
        "First packet: first text delta written -> first audio byte read, client side. Gap: between "
        "consecutive audio chunks of one utterance as the client read them. Underruns: chunks that "
        "arrived after the audio before them had finished playing.",
    ]
    for name, d in result["overhead"].items():
        lines += ["", f"{name} minus direct, p50: " + "; ".join(
            f"c={n}: first packet {stats.fmt(v['first_packet_p50_ms'], 1)} ms, gap {stats.fmt(v['gap_p50_ms'], 1)} ms"
            for n, v in sorted(d.items(), key=lambda kv: int(kv[0]))
        ) + "."]  # fmt: skip
    if result["ray"].get("direct_ingress_error"):
        lines += ["", f"Direct ingress: {result['ray']['direct_ingress_error']}."]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in (
        (axes[0], "first_packets_ms", "first packet (ms)"),
        (axes[1], "gaps_ms", "inter-packet gap (ms)"),
    ):
        data, labels = [], []
        for n in result["settings"]["concurrency"]:
            for name, levels in result["paths"].items():
                for lv in levels:
                    if lv["concurrency"] == n and lv[key]:
                        data.append(lv[key])
                        labels.append(f"{name}\nc={n}")
        if data:
            ax.boxplot(data, showfliers=True, whis=(1, 99))
            ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Ray Serve vs direct server ({result['preset']}, {result['conditions']['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ray_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument(
        "--model", help="checkpoint directory (default: checkpoints/<preset>-base, made if missing)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--concurrency", default="1,8", help="client counts (default %(default)s)")
    ap.add_argument("--rounds", type=int, help="utterances per client (default: per preset)")
    ap.add_argument("--max-new-tokens", type=int, help="frames per utterance + 1 (default: per preset)")
    ap.add_argument("--tokens-per-second", type=float, default=15.0, help="LLM pace of the text deltas")
    ap.add_argument("--first-packet-frames", type=int, default=1)
    ap.add_argument("--packet-frames", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    ap.add_argument("--ray-cpus", type=float, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--replica-cpus", type=float, default=1, help="num_cpus of the replica")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over every path and level")
    ap.add_argument("--direct-ingress", action="store_true", help="also through Ray's direct ingress")
    ap.add_argument("--out", help="result directory")
    return ap


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    preset = PRESETS[a.preset]
    a.rounds = a.rounds or preset["rounds"]
    a.max_new_tokens = a.max_new_tokens or preset["max_new_tokens"]
    a.levels = sorted({int(x) for x in a.concurrency.split(",")})
    model = Path(a.model or ROOT / "checkpoints" / f"{a.preset}-base")
    if a.model is None:
        ensure_checkpoint(model, a.preset)
    started = dt.datetime.now(dt.timezone.utc)
    device = a.device if a.device.startswith("cuda") else f"cpu-{a.threads}threads"
    out = (
        Path(a.out)
        if a.out
        else ROOT / "benchmarks" / "results" / f"ray-{device}-{a.preset}-{started.date()}"
    )
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    tokenizer = TextTokenizer.from_dir(model)
    limit = max(a.max_new_tokens - 2, 1)
    sentences = [(lang, token_deltas(tokenizer, text, limit)) for lang, text in SENTENCES]
    ref_wav = wav_bytes(reference_audio())
    import ray as ray_pkg  # the [ray] extra

    result: dict[str, Any] = {
        "benchmark": "ray_overhead",
        "preset": a.preset,
        "model": str(model),
        "conditions": {
            "date_utc": started.isoformat(timespec="seconds"),
            "git": git_commit(),
            "device": device,
            "torch": torch.__version__,
            "ray": ray_pkg.__version__,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "loadavg_start": loadavg(),
        },
        "settings": {
            "concurrency": a.levels,
            "rounds": a.rounds,
            "max_new_tokens": a.max_new_tokens,
            "tokens_per_second": a.tokens_per_second,
            "first_packet_frames": a.first_packet_frames,
            "packet_frames": a.packet_frames,
            "torch_threads": a.threads,
            "ray_cpus": a.ray_cpus,
            "replica_cpus": a.replica_cpus,
            "repeats": a.repeats,
        },
    }
    addresses: dict[str, tuple[str, str]] = {}  # path -> (address, voice id)
    direct = start_direct(a, model, logs)
    try:
        addresses["direct"] = (direct.address, _create_voice(direct.address, ref_wav))
        print(f"direct server on {direct.address}", flush=True)
        ray_info = start_ray(a, model, logs)
        try:
            result["ray"] = {k: v for k, v in ray_info.items() if k not in ("proxy", "direct_ingress")}
            md = (("application", "qwen3tts"),)
            addresses["Ray proxy"] = (ray_info["proxy"], _create_voice(ray_info["proxy"], ref_wav, md))
            if ray_info.get("direct_ingress"):
                addresses["Ray direct ingress"] = (ray_info["direct_ingress"], addresses["Ray proxy"][1])
            print(f"Ray: {ray_info}", flush=True)
            collected = _interleave(a, addresses, sentences)
        finally:
            stop_ray()
    finally:
        direct.stop()
    result["conditions"]["loadavg_end"] = loadavg()
    result["paths"] = {}
    for name in addresses:
        levels = []
        for n in a.levels:
            figs, wall, errors = collected[(name, n)]
            level = level_summary(n, figs, wall)
            level["gaps_ms"] = [g for f in figs if f["ok"] for g in f["gaps_ms"]]
            level["first_packets_ms"] = [f["first_packet_ms"] for f in figs if f["ok"]]
            level["errors"] = sorted(set(errors))[:5]
            levels.append(level)
        result["paths"][name] = levels
    result["overhead"] = {}
    for name, levels in result["paths"].items():
        if name == "direct":
            continue
        result["overhead"][name] = {
            str(r["concurrency"]): {
                "first_packet_p50_ms": r["first_packet_ms"]["p50"] - d["first_packet_ms"]["p50"],
                "gap_p50_ms": r["gap_ms"]["p50"] - d["gap_ms"]["p50"],
                "gap_p99_ms": r["gap_ms"]["p99"] - d["gap_ms"]["p99"],
            }
            for r, d in zip(levels, result["paths"]["direct"])
        }
    (out / "result.json").write_text(json.dumps(result, indent=1, default=_nan_safe))
    (out / "README.md").write_text(markdown(result))
    plot(result, out / "ray_overhead.png")
    print(f"wrote {out}", flush=True)


def _nan_safe(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    raise TypeError(type(x).__name__)


if __name__ == "__main__":
    main(sys.argv[1:])
