"""The concurrency benchmark: first-packet latency, real-time factor and playback underruns
of the real server under N concurrent LLM-like streams, side by side with the official
qwen-tts package and with the peers' way of decoding, on the same random weights and device.

    .venv/bin/python -m benchmarks --preset tiny                          # make bench-smoke
    .venv/bin/python -m benchmarks --preset 0.6b --concurrency 1,2        # make bench
    .venv/bin/python -m benchmarks --preset 0.6b --device cuda --dtype bfloat16 --max-concurrency 32

One run, in this order, so that every ratio compares figures taken minutes apart:

(a) this engine, streaming: ``qwen3tts-rt serve`` as a subprocess on 127.0.0.1 (port 0);
    for each N, N asyncio gRPC clients each stream ``--rounds`` utterances, one delta per
    BPE token at ``--tokens-per-second``, with an x-vector voice made by CreateVoice.
    Client side: first packet (first delta written -> first audio byte read), gaps, playback
    underruns, RTF; server side: its Prometheus histograms, scraped before and after.
(b) the official package (its own venv, a subprocess) on the same checkpoint, the same
    texts and max_new_tokens: time to first audio = its whole generate + decode.
(c) this engine's frames (regenerated offline, greedy: the server's frames exactly, checked
    against the audio it sent) decoded per packet with 25 frames of left context re-decoded:
    first packet = (a)'s first packet - our decode of that packet + the peers' decode of it;
    RTF = (a)'s compute + the peers' decode - ours, over the audio.

Writes ``benchmarks/results/<device>-<preset>-<date>/``: ``bench.json`` (everything, raw),
``bench.md`` (the tables) and PNG plots. A benchmark measures; it never asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np
import torch

from benchmarks import stats
from benchmarks.decode_cost import PEER_LEFT_CONTEXT, pool_decode_costs, redecode_costs
from benchmarks.engine_cost import device_name
from benchmarks.load import SENTENCES, UtteranceRecord, run_level, token_deltas
from benchmarks.official import run_official
from qwen3tts_rt.audio import write_wav
from qwen3tts_rt.model.text_tokenizer import TextTokenizer
from qwen3tts_rt.synthetic import synthetic_speech
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 24000
FRAME_S = 0.08

# Per preset: concurrency levels on CPU, utterances per client, max_new_tokens (random
# weights never emit EOS: an utterance is max_new_tokens - 1 frames), official runs.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"concurrency": [1, 2, 4, 8, 16], "rounds": 3, "max_new_tokens": 24, "official_runs": 1},
    "0.6b": {"concurrency": [1, 2], "rounds": 3, "max_new_tokens": 20, "official_runs": 1},
    "1.7b": {"concurrency": [1], "rounds": 2, "max_new_tokens": 16, "official_runs": 1},
}
GPU_CONCURRENCY = [1, 2, 4, 8, 16, 32]
SERVER_HISTOGRAMS = (
    "qwen3tts_first_packet_latency_seconds",
    "qwen3tts_time_to_first_audio_seconds",
    "qwen3tts_inter_packet_gap_seconds",
    "qwen3tts_real_time_factor",
    "qwen3tts_queue_wait_seconds",
    "qwen3tts_batch_size",
    "qwen3tts_engine_tick_seconds",
)


# ---------------------------------------------------------------------- conditions


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------- server


class ServerProcess:
    """``qwen3tts-rt serve`` in a subprocess on 127.0.0.1, ports picked by the OS."""

    LINE = re.compile(r" on ([\d.]+:\d+), /metrics on ([\d.]+):(\d+)\s*$")

    def __init__(self, args: list[str], log: IO[str]) -> None:
        cmd = [sys.executable, "-m", "qwen3tts_rt.cli", "serve", "--host", "127.0.0.1", "--port", "0"]
        cmd += ["--metrics-host", "127.0.0.1", "--metrics-port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
        self.log = log
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = self.LINE.search(line)
            if m:
                self.address, self.metrics_port = m.group(1), int(m.group(3))
                break
        else:
            self.proc.wait()
            raise RuntimeError(f"the server exited ({self.proc.returncode}) before serving; see {log.name}")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep the pipe drained

    def scrape(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30) as r:
            text = r.read().decode()
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
        return out

    def rss_mb(self) -> float | None:
        try:
            import psutil

            return round(psutil.Process(self.proc.pid).memory_info().rss / 2**20, 1)
        except Exception:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------- inputs


def reference_audio(seconds: float = 3.0) -> np.ndarray:
    """The synthetic reference voice, quantised to 16 bits as it travels in the WAV (so that
    the official package and the server clone the very same samples)."""
    wav = synthetic_speech(seconds, SAMPLE_RATE)
    pcm = np.clip(np.round(wav * 32767), -32768, 32767).astype(np.int16)
    return (pcm.astype(np.float32) / 32768).astype(np.float32)


def wav_bytes(wav: np.ndarray) -> bytes:
    buf = io.BytesIO()
    write_wav(buf, wav, SAMPLE_RATE)
    return buf.getvalue()


def ensure_checkpoint(path: Path, preset: str) -> None:
    if (path / "config.json").is_file():
        return
    print(f"making the {preset} random-weight checkpoint in {path} ...", flush=True)
    cli = [sys.executable, "-m", "qwen3tts_rt.cli"]
    subprocess.run(
        [*cli, "make-checkpoint", "--preset", preset, "--kind", "base", "--out", str(path)],
        check=True,
        cwd=ROOT,
    )


def concurrency_levels(a: argparse.Namespace, preset: dict[str, Any]) -> list[int]:
    if a.concurrency:
        return sorted({int(x) for x in a.concurrency.split(",")})
    if a.max_concurrency:
        levels = [1 << k for k in range(a.max_concurrency.bit_length()) if 1 << k <= a.max_concurrency]
        return sorted({*levels, a.max_concurrency})
    return GPU_CONCURRENCY if a.device.startswith("cuda") else list(preset["concurrency"])


# ---------------------------------------------------------------------- per-utterance figures


def utterance_figures(rec: UtteranceRecord) -> dict[str, Any]:
    """Client-side figures of one utterance (times in ms unless said)."""
    f: dict[str, Any] = {"ok": rec.error is None and bool(rec.arrivals) and rec.first_sent is not None}
    if not f["ok"]:
        return f
    assert rec.first_sent is not None
    durations = [n / SAMPLE_RATE for n in rec.samples]
    audio_s = sum(durations)
    po = stats.playout(rec.arrivals, durations)
    f.update(
        first_packet_ms=1000 * (rec.arrivals[0] - rec.first_sent),
        stream_to_first_audio_ms=1000 * (rec.arrivals[0] - rec.started),
        gaps_ms=[1000 * g for g in stats.gaps(rec.arrivals)],
        packets=len(rec.arrivals),
        audio_s=audio_s,
        rtf_wall=(rec.arrivals[-1] - rec.first_sent) / audio_s,
        underruns=po.underruns,
        stall_ms=1000 * po.stall_s,
        server_first_packet_ms=(rec.done or {}).get("first_packet_latency_ms", math.nan),
        rtf_compute=(rec.done or {}).get("real_time_factor", math.nan),
        reason=(rec.done or {}).get("reason"),
    )
    return f


def level_summary(n: int, figs: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    ok = [f for f in figs if f["ok"]]

    def col(key: str) -> list[float]:
        return [f[key] for f in ok if not math.isnan(f[key])]

    audio = sum(f["audio_s"] for f in ok)
    return {
        "concurrency": n,
        "utterances": len(ok),
        "failed": len(figs) - len(ok),
        "first_packet_ms": stats.summary(col("first_packet_ms")),
        "server_first_packet_ms": stats.summary(col("server_first_packet_ms")),
        "stream_to_first_audio_ms": stats.summary(col("stream_to_first_audio_ms")),
        "gap_ms": stats.summary([g for f in ok for g in f["gaps_ms"]]),
        "rtf_compute": stats.summary(col("rtf_compute")),
        "rtf_wall": stats.summary(col("rtf_wall")),
        "underruns": sum(f["underruns"] for f in ok),
        "streams_with_underruns": sum(1 for f in ok if f["underruns"]),
        "stall_ms": stats.summary(col("stall_ms")),
        "audio_s": audio,
        "wall_s": wall_s,
        "audio_s_per_wall_s": audio / wall_s if wall_s > 0 else math.nan,
    }


# ---------------------------------------------------------------------- (c) the peers' decode


def peers_decode(
    a: argparse.Namespace, model: Path, ref_wav: bytes, c1: list[tuple[UtteranceRecord, dict[str, Any]]]
) -> dict[str, Any]:
    """Regenerate the frames of the concurrency-1 utterances offline (greedy: the server's
    frames), check them against the audio the server sent, and time decoding them per
    packet ours and the peers' way. Returns per-text costs and per-utterance (c) figures."""
    from qwen3tts_rt.engine.engine import EngineConfig
    from qwen3tts_rt.engine.synth import synthesize
    from qwen3tts_rt.engine.voices import create_voice_clone_prompt, voice_prompt
    from qwen3tts_rt.model.checkpoint import load_checkpoint
    from qwen3tts_rt.model.decoder_pool import DecoderPool
    from qwen3tts_rt.model.sampling import SamplingParams

    ckpt = load_checkpoint(model, device=a.device, dtype=a.dtype)
    clone = create_voice_clone_prompt(ckpt, ref_wav, None, x_vector_only=True, allow_paths=False)
    voice = voice_prompt(ckpt, clone=clone)
    overrides: dict[str, Any] = {"max_new_tokens": a.max_new_tokens}
    if a.sampling == "greedy":
        overrides.update(do_sample=False, subtalker_do_sample=False)
    params = SamplingParams.from_generation_config(ckpt.generation_config, **overrides)
    dec, cdev, cdtype = ckpt.codec.decoder, ckpt.codec.device, ckpt.codec.dtype
    pool = DecoderPool(dec, 1, EngineConfig().fast_path(cdev), cdev, cdtype)  # as the server's engine
    pool.warmup()
    per_text: dict[str, dict[str, Any]] = {}
    timed: dict[tuple[tuple[int, int], ...], tuple[np.ndarray, np.ndarray, str]] = {}
    for rec, _ in c1:
        key = f"{rec.language}|{rec.text}"
        if key in per_text:
            continue
        res = synthesize(ckpt, voice, rec.text, rec.language, params)
        codes = res.frames.to(cdev)  # [T, G]
        bounds = stats.packet_bounds(len(codes), a.first_packet_frames, a.packet_frames)
        # The decoders have no data-dependent paths: a packet's cost depends on its shape only,
        # so the packets of one utterance are timed once per packet layout and shared by the
        # utterances of the same layout. One untimed pass of each first (the stateless decode
        # meets a new input length per packet until 25 frames of context are there), then
        # the cheapest of ``decode_repeats`` timings per packet: the cost of the work, with
        # the least interference from whatever else runs on the machine.
        layout = tuple(bounds)
        if layout not in timed:
            pool_decode_costs(pool, codes, bounds)
            redecode_costs(dec, codes, bounds)
            reps = range(a.decode_repeats)
            timed[layout] = (
                np.min([pool_decode_costs(pool, codes, bounds) for _ in reps], axis=0),
                np.min([redecode_costs(dec, codes, bounds) for _ in reps], axis=0),
                key,
            )
        ours, peers, timed_on = timed[layout]
        entry: dict[str, Any] = {
            "frames": len(codes),
            "packets": len(bounds),
            "ours_decode_ms": [1000 * float(x) for x in ours],  # the engine's decoder pool
            "peers_decode_ms": [1000 * float(x) for x in peers],
            "decode_timed_on": timed_on,
        }
        if a.sampling == "greedy" and rec.pcm is not None:
            sent = np.frombuffer(bytes(rec.pcm), dtype="<i2").astype(np.int32)
            mine = np.clip(np.round(res.wav * 32767), -32768, 32767).astype(np.int32)
            n = min(len(sent), len(mine))
            entry["same_audio_as_server"] = {
                "samples_server": len(sent),
                "samples_offline": len(mine),
                "max_abs_diff_int16": int(np.abs(sent[:n] - mine[:n]).max()) if n else None,
            }
        per_text[key] = entry
    # Utterances this short never give the peers' decode its full context; a long one pays
    # it on every packet. Its steady state, timed on frames repeated up to the length it
    # needs (the cost does not depend on the codes), against our steady per-packet cost.
    pf = a.packet_frames
    sample = res.frames.to(cdev)
    tiled = sample.repeat((PEER_LEFT_CONTEXT + pf) // len(sample) + 1, 1)
    full = [(PEER_LEFT_CONTEXT, PEER_LEFT_CONTEXT + pf)]
    redecode_costs(dec, tiled, full)
    peers_full = min(redecode_costs(dec, tiled, full)[0] for _ in range(a.decode_repeats))
    ours_steady = float(np.median(ours[1:])) if len(ours) > 1 else float(ours[0])
    steady = {
        "packet_frames": pf,
        "ours_decode_ms": 1000 * ours_steady,
        "peers_decode_full_context_ms": 1000 * peers_full,
        "ratio": peers_full / ours_steady,
        "rtf_c_long_utterances_p50": stats.percentile(
            [f["rtf_compute"] + (peers_full - ours_steady) / (pf * FRAME_S) for _, f in c1], 50
        ),
    }
    figures = []
    for rec, fig in c1:
        e = per_text[f"{rec.language}|{rec.text}"]
        ours_s = [x / 1000 for x in e["ours_decode_ms"]]
        peers_s = [x / 1000 for x in e["peers_decode_ms"]]
        c: dict[str, Any] = {
            "first_packet_ms": fig["first_packet_ms"] - 1000 * ours_s[0] + 1000 * peers_s[0],
            "rtf": (fig["rtf_compute"] * fig["audio_s"] - sum(ours_s) + sum(peers_s)) / fig["audio_s"],
        }
        if len(rec.arrivals) == len(peers_s):  # one chunk per packet: model the later arrivals too
            extra = [p - o for p, o in zip(peers_s, ours_s)]
            po = stats.playout(stats.shifted(rec.arrivals, extra), [n / SAMPLE_RATE for n in rec.samples])
            c.update(underruns_modelled=po.underruns, stall_ms_modelled=1000 * po.stall_s)
        figures.append(c)
    return {
        "left_context_frames": PEER_LEFT_CONTEXT,
        "per_text": per_text,
        "utterances": figures,
        "steady_state": steady,
    }


# ---------------------------------------------------------------------- the run


def run(a: argparse.Namespace) -> Path:
    preset = PRESETS[a.preset]
    for key in ("rounds", "max_new_tokens", "official_runs"):
        if getattr(a, key) is None:
            setattr(a, key, preset[key])
    levels = concurrency_levels(a, preset)
    model = Path(a.model or ROOT / "checkpoints" / f"{a.preset}-base")
    if a.model is None:
        ensure_checkpoint(model, a.preset)
    if a.threads is None and not a.device.startswith("cuda"):
        a.threads = 1  # see --threads
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    started = dt.datetime.now(dt.timezone.utc)
    dev_name = device_name(torch.device(a.device))
    out = (
        Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"{dev_name}-{a.preset}-{started.date()}"
    )
    out.mkdir(parents=True, exist_ok=True)

    ref = reference_audio()
    ref_wav = wav_bytes(ref)
    tokenizer = TextTokenizer.from_dir(model)
    # At most max_new_tokens - 2 text tokens: every frame the cap allows speaks text, and the
    # end of text always reaches the server before the cap can fire.
    limit = max(a.max_new_tokens - 2, 1)
    sentences = [(lang, token_deltas(tokenizer, text, limit)) for lang, text in SENTENCES]

    result: dict[str, Any] = {
        "benchmark": "concurrency",
        "preset": a.preset,
        "model": str(model.resolve().relative_to(ROOT))
        if model.resolve().is_relative_to(ROOT)
        else str(model),
        "conditions": {
            "date_utc": started.isoformat(timespec="seconds"),
            "git": git_commit(),
            "device": dev_name,
            "dtype": a.dtype,
            "torch": torch.__version__,
            "torch_threads": threads,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "loadavg_start": loadavg(),
        },
        "settings": {
            "concurrency": levels,
            "rounds": a.rounds,
            "tokens_per_second": a.tokens_per_second,
            "max_new_tokens": a.max_new_tokens,
            "text_tokens_per_utterance_at_most": limit,
            "sampling": a.sampling,
            "first_packet_frames": a.first_packet_frames,
            "packet_frames": a.packet_frames,
            "voice": "x-vector clone (CreateVoice, x_vector_only) of a synthetic 3 s reference",
            "pause_between_utterances_s": a.pause_s,
        },
        "levels": [],
    }
    log_dir = Path(tempfile.mkdtemp(prefix="bench-"))
    print(f"results -> {out}; server log {log_dir / 'server.log'}", flush=True)

    # (a) the engine behind the real server
    phases: dict[str, float] = {}
    result["conditions"]["phases_s"] = phases
    t_run = time.perf_counter()
    c1: list[tuple[UtteranceRecord, dict[str, Any]]] = []
    with (log_dir / "server.log").open("w") as log:
        server_args = ["--model", str(model), "--device", a.device, "--dtype", a.dtype]
        server_args += ["--max-sessions", str(max(levels)), "--voices-dir", str(log_dir / "voices")]
        server_args += ["--first-packet-frames", str(a.first_packet_frames)]
        server_args += ["--packet-frames", str(a.packet_frames), "--torch-threads", str(threads)]
        t0 = time.perf_counter()
        server = ServerProcess(server_args, log)
        result["conditions"]["server_start_s"] = round(time.perf_counter() - t0, 1)
        try:
            with grpc.insecure_channel(server.address) as ch:
                stub = pb_grpc.TextToSpeechStub(ch)
                info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=60)
                voice = stub.CreateVoice(
                    pb.CreateVoiceRequest(ref_audio=ref_wav, x_vector_only=True, display_name="bench"),
                    timeout=600,
                )
            result["server"] = {"device": info.device, "dtype": info.dtype, "model_size": info.model_size}
            config = pb.StreamConfig(
                voice_id=voice.voice_id, encoding=pb.PCM_S16LE, sample_rate_hz=SAMPLE_RATE
            )
            config.first_packet_frames = a.first_packet_frames
            config.packet_frames = a.packet_frames
            config.sampling.max_new_tokens = a.max_new_tokens
            if a.sampling == "greedy":
                config.sampling.greedy = True
            # Warm-up stream (not recorded): the first call's lazy paths.
            asyncio.run(run_level(server.address, config, [[sentences[0]]], a.tokens_per_second))
            for n in levels:
                plan = [[sentences[(i + r) % len(sentences)] for r in range(a.rounds)] for i in range(n)]
                before, load0 = server.scrape(), loadavg()
                w0 = time.perf_counter()
                recs = asyncio.run(
                    run_level(
                        server.address, config, plan, a.tokens_per_second, pause_s=a.pause_s, keep_pcm=n == 1
                    )
                )
                wall = time.perf_counter() - w0
                after = server.scrape()
                figs = [utterance_figures(r) for r in recs]
                summary = level_summary(n, figs, wall)
                summary["loadavg_before"], summary["loadavg_after"] = load0, loadavg()
                summary["server_rss_mb"] = server.rss_mb()
                summary["server_histograms"] = {
                    h: stats.histogram_delta(before, after, h) for h in SERVER_HISTOGRAMS
                }
                summary["errors"] = [r.error for r in recs if r.error]
                summary["utterances_raw"] = [{**r.to_json(), **f} for r, f in zip(recs, figs)]
                result["levels"].append(summary)
                if n == 1:
                    c1 = [(r, f) for r, f in zip(recs, figs) if f["ok"]]
                fp = summary["first_packet_ms"]
                print(
                    f"concurrency {n:3d}: {summary['utterances']} utterances, first packet p50 "
                    f"{stats.fmt(fp['p50'])} ms p99 {stats.fmt(fp['p99'])} ms, RTF compute p50 "
                    f"{stats.fmt(summary['rtf_compute']['p50'], 3)}, underruns {summary['underruns']}, "
                    f"load {summary['loadavg_after']}",
                    flush=True,
                )
        finally:
            server.stop()

    phases["sweep"] = round(time.perf_counter() - t_run, 1)

    # (b) the official package, same texts, same checkpoint, right after
    c1_texts = list(dict.fromkeys((r.language, r.text) for r, _ in c1))
    baselines: dict[str, Any] = {}
    if a.official and c1_texts:
        load0 = loadavg()
        try:
            off = run_official(
                model,
                [{"text": t, "language": lang} for lang, t in c1_texts],
                ref_audio=ref,
                max_new_tokens=a.max_new_tokens,
                greedy=a.sampling == "greedy",
                device=a.device,
                dtype=a.dtype,
                threads=threads,
                runs=a.official_runs,
            )
            off["loadavg_before"], off["loadavg_after"] = load0, loadavg()
            baselines["official"] = off
            print(f"official qwen-tts: {len(off['runs'])} runs, load {off['loadavg_after']}", flush=True)
        except Exception as e:  # recorded, the rest of the run goes on
            baselines["official"] = {"error": str(e)}
            print(f"official qwen-tts failed: {e}", flush=True)

    phases["official"] = round(time.perf_counter() - t_run - phases["sweep"], 1)

    # (c) our frames, decoded the peers' way
    if a.peers and c1:
        load0 = loadavg()
        peers = peers_decode(a, model, ref_wav, c1)
        peers["loadavg_before"], peers["loadavg_after"] = load0, loadavg()
        baselines["peers_decode"] = peers
        print(f"peers' decode timed, load {peers['loadavg_after']}", flush=True)
    phases["peers"] = round(time.perf_counter() - t_run - phases["sweep"] - phases["official"], 1)
    result["baselines"] = baselines
    result["comparison"] = comparison(c1, baselines)
    result["conditions"]["loadavg_end"] = loadavg()
    result["conditions"]["wall_s"] = round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1)

    (out / "bench.json").write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    render(out)
    print((out / "bench.md").read_text())
    return out


def comparison(
    c1: list[tuple[UtteranceRecord, dict[str, Any]]], baselines: dict[str, Any]
) -> list[dict[str, Any]]:
    """Rows of the side-by-side table at concurrency 1, with ratios to (a)."""
    if not c1:
        return []
    a_fp = stats.summary([f["first_packet_ms"] for _, f in c1])
    a_rtf = stats.summary([f["rtf_compute"] for _, f in c1])
    rows: list[dict[str, Any]] = [
        {"what": "(a) qwen3tts-rt, streaming", "first_packet_ms": a_fp, "rtf": a_rtf}
    ]
    off = baselines.get("official", {})
    if off.get("runs"):
        fp = stats.summary([1000 * r["total_s"] for r in off["runs"]])
        rtf = stats.summary([r["rtf"] for r in off["runs"]])
        rows.append(
            {"what": "(b) official qwen-tts (whole generate + decode)", "first_packet_ms": fp, "rtf": rtf}
        )
    peers = baselines.get("peers_decode", {})
    if peers.get("utterances"):
        fp = stats.summary([u["first_packet_ms"] for u in peers["utterances"]])
        rtf = stats.summary([u["rtf"] for u in peers["utterances"]])
        rows.append(
            {
                "what": f"(c) our frames, {PEER_LEFT_CONTEXT} frames of left context re-decoded",
                "first_packet_ms": fp,
                "rtf": rtf,
            }
        )
    for r in rows[1:]:
        r["ratio_first_packet"] = stats.ratio(r["first_packet_ms"]["p50"], a_fp["p50"])
        r["ratio_rtf"] = stats.ratio(r["rtf"]["p50"], a_rtf["p50"])
    return rows


def markdown(result: dict[str, Any]) -> str:
    c, s = result["conditions"], result["settings"]
    lines = [
        f"# Concurrency benchmark: {result['preset']} on {c['device']} ({c['dtype']})",
        "",
        f"{c['date_utc']}, commit {c['git']['commit'][:10]}{' (dirty tree)' if c['git']['dirty'] else ''}, "
        f"torch {c['torch']} with {c['torch_threads']} thread(s) on {c['cpu_count']} CPUs; "
        f"load average {c['loadavg_start']} at the start, {c['loadavg_end']} at the end "
        "(other work shared the machine when the load exceeds the thread count). "
        f"Random weights in the official layout ({result['model']}); x-vector voice; "
        f"{s['sampling']} sampling; max_new_tokens {s['max_new_tokens']} "
        f"(utterances of {s['max_new_tokens'] - 1} frames = {0.08 * (s['max_new_tokens'] - 1):.2f} s); "
        f"at most {s['text_tokens_per_utterance_at_most']} text tokens per utterance, one delta per token at "
        f"{s['tokens_per_second']:g} tokens/s; {s['rounds']} utterances per client; packets of "
        f"{s['first_packet_frames']} frame(s) first, then {s['packet_frames']}.",
        "",
        "## (a) the server under N concurrent streams (client side)",
        "",
        stats.concurrency_table(result["levels"]),
        "",
        "First packet: first text delta written -> first audio byte read (client side); server first "
        "packet: the same as the server measured it. RTF compute: the server's compute time of the "
        "utterance (each engine tick's time shared among the utterances stepped in it) / its audio "
        "time: the cost of one stream. RTF wall: first delta -> last audio byte, over the audio: "
        "above 1 the listener waits. Underruns: packets that arrived after the audio before them "
        "had finished playing (playback starting at the first packet); stall: the silence they caused.",
        "",
    ]
    if result.get("comparison"):
        lines += [
            "## Side by side at concurrency 1 (same checkpoint, same texts, same run)",
            "",
            stats.comparison_table(result["comparison"]),
            "",
            "(b) does not stream: nothing is heard before its generate + decode returns. (c) is "
            "(a)'s first packet with our decode of that packet replaced by the peers' re-decode "
            "of it, and (a)'s compute with every packet decoded that way.",
            "",
        ]
        peers = result["baselines"].get("peers_decode", {})
        for key, e in peers.get("per_text", {}).items():
            same = e.get("same_audio_as_server")
            check = f"offline frames = server's audio to {same['max_abs_diff_int16']} LSB; " if same else ""
            lines.append(
                f"* `{key.split('|', 1)[1][:40]}`: {e['frames']} frames, {e['packets']} packets; {check}"
                f"decode per packet p50 ours {stats.fmt(stats.percentile(e['ours_decode_ms'], 50), 1)} ms, "
                f"peers' {stats.fmt(stats.percentile(e['peers_decode_ms'], 50), 1)} ms"
                + (
                    ""
                    if e["decode_timed_on"] == key
                    else " (same packet layout: timed once, on the first text)"
                )
            )
        st = peers.get("steady_state")
        if st:
            lines.append(
                f"* Long utterances (every packet with its full {PEER_LEFT_CONTEXT} frames of context): "
                f"decode per {st['packet_frames']}-frame packet ours {st['ours_decode_ms']:.1f} ms, peers' "
                f"{st['peers_decode_full_context_ms']:.1f} ms ({st['ratio']:.1f}x); (c)'s RTF would be "
                f"{st['rtf_c_long_utterances_p50']:.3f}"
                f" ({stats.ratio(st['rtf_c_long_utterances_p50'], result['comparison'][0]['rtf']['p50']):.2f}x (a))."
            )
        off = result["baselines"].get("official", {})
        if off.get("error"):
            lines.append(f"* (b) failed: {off['error'][:300]}")
        lines.append("")
    return "\n".join(lines)


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(type(x).__name__)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Concurrency benchmark of the gRPC server, with the official package and the peers' decode side by side.",
    )
    ap.add_argument(
        "--preset", default="tiny", choices=sorted(PRESETS), help="checkpoint size (default: %(default)s)"
    )
    ap.add_argument(
        "--model", help="checkpoint directory (default: checkpoints/<preset>-base, made if missing)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument(
        "--threads",
        type=int,
        help="torch threads of the server and the baselines (default on CPU: 1; on a machine shared "
        "with other work, intra-op threads that wait on each other made steps 20-50x slower)",
    )
    ap.add_argument("--concurrency", help="levels, e.g. 1,2,4 (default: per preset; 1..32 on CUDA)")
    ap.add_argument("--max-concurrency", type=int, help="sweep 1, 2, 4, ... up to this")
    ap.add_argument("--rounds", type=int, help="utterances per client at each level")
    ap.add_argument("--tokens-per-second", type=float, default=30.0, help="text deltas per second")
    ap.add_argument("--max-new-tokens", type=int, help="bounds each utterance (random weights never end)")
    ap.add_argument("--sampling", default="greedy", choices=["greedy", "default"])
    ap.add_argument("--first-packet-frames", type=int, default=1)
    ap.add_argument("--packet-frames", type=int, default=1)
    ap.add_argument("--pause-s", type=float, default=0.2, help="between a client's utterances")
    ap.add_argument("--official", action=argparse.BooleanOptionalAction, default=True, help="baseline (b)")
    ap.add_argument("--official-runs", type=int, help="runs of each text by the official package")
    ap.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True, help="baseline (c)")
    ap.add_argument(
        "--decode-repeats", type=int, default=3, help="timings of each decode (the least is kept)"
    )
    ap.add_argument("--out", help="results folder (default: benchmarks/results/<device>-<preset>-<date>)")
    ap.add_argument(
        "--render", metavar="DIR", help="only re-write bench.md and the plots from DIR/bench.json"
    )
    return ap


def render(out: Path) -> None:
    """Re-write ``bench.md`` and the plots of a result folder from its ``bench.json``."""
    from benchmarks.plots import write_plots

    result = json.loads((out / "bench.json").read_text())
    (out / "bench.md").write_text(markdown(result))
    write_plots(result, out)


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    if a.render:
        render(Path(a.render))
    else:
        run(a)
