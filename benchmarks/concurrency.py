"""The concurrency benchmark: first-packet latency, real-time factor and playback underruns
of the real server under N concurrent LLM-like streams, per packet policy and text pace, side
by side with the official qwen-tts package and with the peers' way of decoding, on the same
random weights and device.

    .venv/bin/python -m benchmarks --preset tiny                          # make bench-smoke
    .venv/bin/python -m benchmarks --preset 0.6b --concurrency 1,2        # make bench
    .venv/bin/python -m benchmarks --preset 0.6b --device cuda --dtype bfloat16 --max-concurrency 32
    .venv/bin/python -m benchmarks --preset tiny --concurrency 1,4,16 --packets fixed1,adaptive --text-pace 30,0

One run, in this order, so that every ratio compares figures taken minutes apart:

(a) this engine, streaming: for each packet policy of ``--packets`` (``fixed1``, ``fixedN``,
    ``adaptive``, ``adaptiveM``), ``qwen3tts-rt serve`` as a subprocess on 127.0.0.1 (port 0)
    with that policy's flags; for each text pace of ``--text-pace`` (tokens/s; 0 = the whole
    text at once) and each N, N asyncio gRPC clients each stream ``--rounds`` utterances, one
    delta per BPE token, with an x-vector voice made by CreateVoice. Client side: first
    packet (first delta written -> first audio byte read), gaps, playback underruns, RTF,
    the packets each utterance arrived in (frame ranges from ``sample_offset``); server side:
    its Prometheus histograms and decoder counters, scraped before and after each level.
(b) the official package (its own venv, a subprocess) on the same checkpoint, the same
    texts and max_new_tokens, once: time to first audio = its whole generate + decode.
(c) per policy, this engine's frames (regenerated offline, greedy: the server's frames
    exactly, checked against the audio it sent) decoded in the packets the server sent them
    in, ours and with 25 frames of left context re-decoded per packet (the peers' way):
    first packet = (a)'s first packet - our decode of that packet + the peers' decode of it;
    RTF = (a)'s compute + the peers' decode - ours, over the audio.

The first policy and the first pace are the main ones: the legacy tables, (b), the plots.
Ratios between policies are against ``fixed1`` when it is in the list (else the first).

Writes ``benchmarks/results/<device>-<preset>-<date>[-<policies>][-<paces>]/``: ``bench.json``
(everything, raw), ``bench.md`` (the tables) and PNG plots. A benchmark measures; it never
asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
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
from dataclasses import dataclass
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
SAMPLES_PER_FRAME = round(SAMPLE_RATE * FRAME_S)  # 1920: packets carry whole frames at this rate

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
    "qwen3tts_packet_frames",
)


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------------- packet policies and text paces


@dataclass(frozen=True)
class PacketPolicy:
    """One entry of ``--packets``: ``fixedN`` (every packet after the first has N frames)
    or ``adaptive`` / ``adaptiveM`` (later packets grow while the listener is ahead, up to
    M frames; M defaults to ``--max-packet-frames``)."""

    name: str
    kind: str  # "fixed" | "adaptive"
    frames: int  # fixed: frames per later packet; adaptive: the most frames per packet

    def server_args(self, first_packet_frames: int, serve_flags: set[str]) -> list[str]:
        """The ``serve`` flags of this policy. A server without ``--packet-policy`` (before
        the adaptive policy, issue 17) has fixed packets only: ``--packet-frames`` alone."""
        args = ["--first-packet-frames", str(first_packet_frames)]
        if self.kind == "fixed":
            if "--packet-policy" in serve_flags:
                args += ["--packet-policy", "fixed"]
            return [*args, "--packet-frames", str(self.frames)]
        return [*args, "--packet-policy", "adaptive", "--max-packet-frames", str(self.frames)]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "frames": self.frames}


def parse_packets(spec: str, max_packet_frames: int) -> list[PacketPolicy]:
    """``fixed1,adaptive,fixed8,adaptive4`` -> policies, in order, without repeats."""
    out: list[PacketPolicy] = []
    for item in (x.strip().lower() for x in spec.split(",")):
        m = re.fullmatch(r"(fixed|adaptive)(\d*)", item)
        if not m or (m.group(1) == "fixed" and not m.group(2)):
            raise ValueError(
                f"--packets: {item!r} is not fixedN, adaptive or adaptiveM (e.g. fixed1,adaptive)"
            )
        frames = int(m.group(2)) if m.group(2) else max_packet_frames
        if frames < 1:
            raise ValueError(f"--packets: {item!r} needs at least 1 frame per packet")
        name = m.group(1) + (str(frames) if m.group(1) == "fixed" or frames != max_packet_frames else "")
        if any(p.name == name for p in out):
            raise ValueError(f"--packets: {name} is listed twice")
        out.append(PacketPolicy(name, m.group(1), frames))
    if not out:
        raise ValueError("--packets: no policy")
    return out


def parse_paces(spec: str) -> list[float]:
    """``30,0`` -> text paces in tokens (deltas) per second; 0 or ``all``: every delta at once."""
    out: list[float] = []
    for item in (x.strip().lower() for x in spec.split(",")):
        rate = 0.0 if item in ("0", "all", "inf") else float(item)
        if rate < 0 or not math.isfinite(rate):
            raise ValueError(f"--text-pace: {item!r} is not a rate >= 0")
        if rate not in out:
            out.append(rate)
    return out


def pace_label(rate: float) -> str:
    return "all at once" if rate == 0 else f"{rate:g} tokens/s"


def _pace_tag(rate: float) -> str:
    return "all" if rate == 0 else f"{rate:g}tps"


def reference_policy(names: list[str]) -> str:
    """What the other policies are compared with: fixed1 if run, else the first."""
    return "fixed1" if "fixed1" in names else names[0]


def serve_flags() -> set[str]:
    """The flags ``qwen3tts-rt serve --help`` lists (what this tree's server accepts)."""
    cmd = [sys.executable, "-m", "qwen3tts_rt.cli", "serve", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"`qwen3tts-rt serve --help` failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return set(re.findall(r"--[a-z][a-z0-9-]*", out.stdout))


def check_policies(policies: list[PacketPolicy], flags: set[str]) -> None:
    """Refuse, before anything runs, a policy this server cannot be told to use."""
    need = {"adaptive": ("--packet-policy", "--max-packet-frames")}
    for p in policies:
        missing = [f for f in need.get(p.kind, ()) if f not in flags]
        if missing:
            raise SystemExit(
                f"--packets {p.name}: `qwen3tts-rt serve` in this tree has no {' / '.join(missing)} "
                "(the adaptive packet policy of issue 17 is not in this server yet); "
                "run fixed policies only (e.g. --packets fixed1,fixed8) or update the tree."
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
            log.flush()
            tail = _tail(Path(log.name))
            raise RuntimeError(
                f"the server exited ({self.proc.returncode}) before serving; see {log.name}"
                + (f"; it said:\n{tail}" if tail else "")
            )
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
    frames = stats.packet_frames(rec.samples, SAMPLES_PER_FRAME)
    f.update(
        first_packet_ms=1000 * (rec.arrivals[0] - rec.first_sent),
        stream_to_first_audio_ms=1000 * (rec.arrivals[0] - rec.started),
        gaps_ms=[1000 * g for g in stats.gaps(rec.arrivals)],
        packets=len(rec.arrivals),
        packet_frames=frames,
        frames=sum(frames),
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
    later = collections.Counter(x for f in ok for x in f.get("packet_frames", [])[1:])
    packets = sum(f["packets"] for f in ok)
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
        "packets_per_utterance": stats.summary([float(f["packets"]) for f in ok]),
        "frames_per_packet_mean": sum(f.get("frames", math.nan) for f in ok) / packets
        if packets
        else math.nan,
        "first_packet_frames": stats.summary([f["packet_frames"][0] for f in ok if f.get("packet_frames")]),
        "later_packet_frames": {f"{k:g}": v for k, v in sorted(later.items())},
        "audio_s": audio,
        "wall_s": wall_s,
        "audio_s_per_wall_s": audio / wall_s if wall_s > 0 else math.nan,
    }


def layout_mismatches(
    recs: list[UtteranceRecord], figs: list[dict[str, Any]], first: int, pol: PacketPolicy
) -> int:
    """Utterances of a fixed policy not cut as that policy cuts (0 for adaptive): a server
    that ignored the policy flags shows here."""
    if pol.kind != "fixed":
        return 0
    bad = 0
    for r, f in zip(recs, figs):
        if f["ok"]:
            got = stats.observed_bounds(r.offsets, r.samples, SAMPLES_PER_FRAME)
            total = round(f["frames"])
            bad += got != stats.packet_bounds(total, first, pol.frames)
    return bad


# ---------------------------------------------------------------------- (c) the peers' decode


def ours_decode_costs(pool: Any, codes: torch.Tensor, bounds: list[tuple[int, int]]) -> list[float]:
    """Seconds per packet of our decode, as the engine decodes (see decode_cost)."""
    return pool_decode_costs(pool, codes, bounds)


def peers_decode(
    a: argparse.Namespace,
    model: Path,
    ref_wav: bytes,
    runs: list[tuple[PacketPolicy, list[tuple[UtteranceRecord, dict[str, Any]]]]],
) -> dict[str, dict[str, Any]]:
    """Per policy: regenerate the frames of its concurrency-1 utterances offline (greedy:
    the server's frames; once per text for every policy), check them against the audio the
    server sent, and time decoding them in the packets the server sent (their frame ranges,
    observed; a fixed policy's own cut if they are not known), ours and the peers' way.
    Returns per policy the per-text costs, the per-utterance (c) figures and the steady
    state of long utterances."""
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
    generated: dict[str, tuple[torch.Tensor, np.ndarray]] = {}
    # The decoders have no data-dependent paths: a packet's cost depends on its shape only,
    # so each packet layout is timed once and shared by the utterances (of any policy) cut
    # the same way. One untimed pass first (the stateless decode meets a new input length
    # per packet until 25 frames of context are there), then the cheapest of
    # ``decode_repeats`` timings per packet: the cost of the work, with the least
    # interference from whatever else runs on the machine.
    timed: dict[tuple[tuple[int, int], ...], tuple[np.ndarray, np.ndarray, str]] = {}

    def timings(
        codes: torch.Tensor, bounds: list[tuple[int, int]], key: str
    ) -> tuple[np.ndarray, np.ndarray, str]:
        layout = tuple(bounds)
        if layout not in timed:
            ours_decode_costs(pool, codes, bounds)
            redecode_costs(dec, codes, bounds)
            reps = range(a.decode_repeats)
            timed[layout] = (
                np.min([ours_decode_costs(pool, codes, bounds) for _ in reps], axis=0),
                np.min([redecode_costs(dec, codes, bounds) for _ in reps], axis=0),
                key,
            )
        return timed[layout]

    out: dict[str, dict[str, Any]] = {}
    for pol, c1 in runs:
        per_text: dict[str, dict[str, Any]] = {}
        figures: list[dict[str, Any]] = []
        skipped: list[str] = []
        sizes: collections.Counter[int] = collections.Counter()
        for rec, fig in c1:
            key = f"{rec.language}|{rec.text}"
            if key not in generated:
                res = synthesize(ckpt, voice, rec.text, rec.language, params)
                generated[key] = (res.frames.to(cdev), res.wav)  # [T, G]
            codes, wav = generated[key]
            bounds = stats.observed_bounds(rec.offsets, rec.samples, SAMPLES_PER_FRAME)
            source = "observed"
            if bounds is None or bounds[-1][1] != len(codes):
                if pol.kind != "fixed":
                    skipped.append(f"{key[:40]}: packet frame ranges not known or not {len(codes)} frames")
                    continue
                bounds, source = stats.packet_bounds(len(codes), a.first_packet_frames, pol.frames), "policy"
            sizes.update(e - s for s, e in bounds[1:])
            ours, peers, timed_on = timings(codes, bounds, key)
            if key not in per_text:
                entry: dict[str, Any] = {
                    "frames": len(codes),
                    "packets": len(bounds),
                    "bounds": bounds,
                    "bounds_from": source,
                    "ours_decode_ms": [1000 * float(x) for x in ours],  # as the engine's decoder pool
                    "peers_decode_ms": [1000 * float(x) for x in peers],
                    "decode_timed_on": timed_on,
                }
                if a.sampling == "greedy" and rec.pcm is not None:
                    sent = np.frombuffer(bytes(rec.pcm), dtype="<i2").astype(np.int32)
                    mine = np.clip(np.round(wav * 32767), -32768, 32767).astype(np.int32)
                    n = min(len(sent), len(mine))
                    entry["same_audio_as_server"] = {
                        "samples_server": len(sent),
                        "samples_offline": len(mine),
                        "max_abs_diff_int16": int(np.abs(sent[:n] - mine[:n]).max()) if n else None,
                    }
                per_text[key] = entry
            ours_s, peers_s = [float(x) for x in ours], [float(x) for x in peers]
            c: dict[str, Any] = {
                "text": key,
                "packets": len(bounds),
                "first_packet_ms": fig["first_packet_ms"] - 1000 * ours_s[0] + 1000 * peers_s[0],
                "rtf": (fig["rtf_compute"] * fig["audio_s"] - sum(ours_s) + sum(peers_s)) / fig["audio_s"],
                "ours_decode_ms_total": 1000 * sum(ours_s),
                "peers_decode_ms_total": 1000 * sum(peers_s),
            }
            if len(rec.arrivals) == len(peers_s):  # one chunk per packet: model the later arrivals too
                extra = [p - o for p, o in zip(peers_s, ours_s)]
                po = stats.playout(stats.shifted(rec.arrivals, extra), [n / SAMPLE_RATE for n in rec.samples])
                c.update(underruns_modelled=po.underruns, stall_ms_modelled=1000 * po.stall_s)
            figures.append(c)
        result: dict[str, Any] = {
            "policy": pol.name,
            "left_context_frames": PEER_LEFT_CONTEXT,
            "per_text": per_text,
            "utterances": figures,
            "skipped": skipped,
        }
        if figures:
            # Utterances this short never give the peers' decode its full context; a long one
            # pays it on every packet. The steady state: a packet of the policy's usual size
            # (fixed: its size; adaptive: the most common later size it sent) after
            # PEER_LEFT_CONTEXT frames, ours (the state carried) and the peers' (re-decoded),
            # timed on frames repeated to the length needed (the cost does not depend on the codes).
            pf = sizes.most_common(1)[0][0] if pol.kind != "fixed" and sizes else pol.frames
            sample = next(iter(generated.values()))[0]
            ctx = PEER_LEFT_CONTEXT
            tiled = sample.repeat((ctx + pf) // len(sample) + 1, 1)
            warm = [(0, ctx), (ctx, ctx + pf)]
            ours_decode_costs(pool, tiled, warm)
            redecode_costs(dec, tiled, warm[1:])
            reps = range(a.decode_repeats)
            ours_full = min(ours_decode_costs(pool, tiled, warm)[1] for _ in reps)
            peers_full = min(redecode_costs(dec, tiled, warm[1:])[0] for _ in reps)
            result["steady_state"] = {
                "packet_frames": pf,
                "packet_frames_from": "most common later packet"
                if pol.kind != "fixed" and sizes
                else "policy",
                "ours_decode_ms": 1000 * ours_full,
                "peers_decode_full_context_ms": 1000 * peers_full,
                "ratio": peers_full / ours_full,
                "rtf_c_long_utterances_p50": stats.percentile(
                    [f["rtf_compute"] + (peers_full - ours_full) / (pf * FRAME_S) for _, f in c1], 50
                ),
            }
        out[pol.name] = result
    return out


# ---------------------------------------------------------------------- the run


def results_dir(
    a: argparse.Namespace, dev_name: str, date: dt.date, names: list[str], paces: list[float]
) -> Path:
    if a.out:
        return Path(a.out)
    name = f"{dev_name}-{a.preset}-{date}"
    if names != ["fixed1"]:
        name += "-" + "+".join(names)
    if paces != [30.0]:
        name += "-" + "+".join(_pace_tag(r) for r in paces)
    return ROOT / "benchmarks" / "results" / name


def run(a: argparse.Namespace) -> Path:
    preset = PRESETS[a.preset]
    for key in ("rounds", "max_new_tokens", "official_runs"):
        if getattr(a, key) is None:
            setattr(a, key, preset[key])
    levels = concurrency_levels(a, preset)
    try:
        policies = parse_packets(a.packets or f"fixed{a.packet_frames}", a.max_packet_frames)
        paces = parse_paces(a.text_pace) if a.text_pace else [a.tokens_per_second]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    flags = serve_flags()
    check_policies(policies, flags)
    names = [p.name for p in policies]
    ref_policy = reference_policy(names)
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
    out = results_dir(a, dev_name, started.date(), names, paces)
    out.mkdir(parents=True, exist_ok=True)

    ref = reference_audio()
    ref_wav = wav_bytes(ref)
    tokenizer = TextTokenizer.from_dir(model)
    # At most max_new_tokens - 2 text tokens: every frame the cap allows speaks text, and the
    # end of text always reaches the server before the cap can fire.
    limit = max(a.max_new_tokens - 2, 1)
    sentences = [(lang, token_deltas(tokenizer, text, limit)) for lang, text in SENTENCES]

    main_policy = policies[0]
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
            "server_has_packet_policy": "--packet-policy" in flags,
        },
        "settings": {
            "concurrency": levels,
            "rounds": a.rounds,
            "tokens_per_second": paces[0],
            "text_paces": paces,
            "max_new_tokens": a.max_new_tokens,
            "text_tokens_per_utterance_at_most": limit,
            "sampling": a.sampling,
            "first_packet_frames": a.first_packet_frames,
            "packet_frames": main_policy.frames if main_policy.kind == "fixed" else None,
            "packets": names,
            "packet_policies": [p.to_json() for p in policies],
            "reference_policy": ref_policy,
            "voice": "x-vector clone (CreateVoice, x_vector_only) of a synthetic 3 s reference",
            "pause_between_utterances_s": a.pause_s,
        },
        "sweeps": [],
        "levels": [],
    }
    log_dir = Path(tempfile.mkdtemp(prefix="bench-"))
    print(
        f"results -> {out}; server log {log_dir / 'server.log'}"
        + (f" (other policies: {log_dir}/<policy>/server.log)" if len(policies) > 1 else ""),
        flush=True,
    )

    # (a) the engine behind the real server, one server per packet policy
    phases: dict[str, float] = {}
    result["conditions"]["phases_s"] = phases
    t_run = time.perf_counter()
    c1: dict[str, list[tuple[UtteranceRecord, dict[str, Any]]]] = {}
    result["servers"] = {}
    for pol in policies:
        # the main policy's log where it always was (gpu_run archives every */server.log)
        pol_dir = log_dir if pol is main_policy else log_dir / pol.name
        pol_dir.mkdir(exist_ok=True)
        with (pol_dir / "server.log").open("w") as log:
            server_args = ["--model", str(model), "--device", a.device, "--dtype", a.dtype]
            server_args += [
                "--max-sessions",
                str(max(levels)),
                "--voices-dir",
                str(log_dir / f"voices-{pol.name}"),
            ]
            server_args += ["--torch-threads", str(threads)]
            server_args += pol.server_args(a.first_packet_frames, flags)
            t0 = time.perf_counter()
            server = ServerProcess(server_args, log)
            srv: dict[str, Any] = {"args": server_args, "start_s": round(time.perf_counter() - t0, 1)}
            result["servers"][pol.name] = srv
            if pol is main_policy:
                result["conditions"]["server_start_s"] = srv["start_s"]
            try:
                with grpc.insecure_channel(server.address) as ch:
                    stub = pb_grpc.TextToSpeechStub(ch)
                    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=60)
                    voice = stub.CreateVoice(
                        pb.CreateVoiceRequest(ref_audio=ref_wav, x_vector_only=True, display_name="bench"),
                        timeout=600,
                    )
                srv["info"] = {"device": info.device, "dtype": info.dtype, "model_size": info.model_size}
                result.setdefault("server", srv["info"])
                # Packet sizes come from the server's flags (the stream leaves them at 0 =
                # server default), so that a policy the stream cannot name still applies.
                config = pb.StreamConfig(
                    voice_id=voice.voice_id, encoding=pb.PCM_S16LE, sample_rate_hz=SAMPLE_RATE
                )
                config.sampling.max_new_tokens = a.max_new_tokens
                if a.sampling == "greedy":
                    config.sampling.greedy = True
                # Warm-up stream (not recorded): the first call's lazy paths.
                asyncio.run(run_level(server.address, config, [[sentences[0]]], paces[0]))
                for rate in paces:
                    sweep: dict[str, Any] = {
                        "policy": pol.name,
                        "packet_policy": pol.to_json(),
                        "tokens_per_second": rate,
                        "pace": pace_label(rate),
                        "levels": [],
                    }
                    result["sweeps"].append(sweep)
                    for n in levels:
                        plan = [
                            [sentences[(i + r) % len(sentences)] for r in range(a.rounds)] for i in range(n)
                        ]
                        before, load0 = server.scrape(), loadavg()
                        w0 = time.perf_counter()
                        recs = asyncio.run(
                            run_level(server.address, config, plan, rate, pause_s=a.pause_s, keep_pcm=n == 1)
                        )
                        wall = time.perf_counter() - w0
                        after = server.scrape()
                        figs = [utterance_figures(r) for r in recs]
                        summary = {
                            "policy": pol.name,
                            "tokens_per_second": rate,
                            **level_summary(n, figs, wall),
                        }
                        summary["loadavg_before"], summary["loadavg_after"] = load0, loadavg()
                        summary["server_rss_mb"] = server.rss_mb()
                        summary["server_histograms"] = {
                            h: stats.histogram_delta(before, after, h) for h in SERVER_HISTOGRAMS
                        }
                        pf = summary["server_histograms"]["qwen3tts_packet_frames"]
                        pf_count = sum(h["count"] for h in pf.values())
                        summary["server_packet_frames_mean"] = (
                            sum(h["sum"] for h in pf.values()) / pf_count if pf_count else math.nan
                        )
                        summary["decoder"] = stats.decoder_cost(before, after)
                        summary["fixed_layout_mismatches"] = layout_mismatches(
                            recs, figs, a.first_packet_frames, pol
                        )
                        summary["errors"] = [r.error for r in recs if r.error]
                        summary["utterances_raw"] = [{**r.to_json(), **f} for r, f in zip(recs, figs)]
                        sweep["levels"].append(summary)
                        if n == 1 and rate == paces[0]:
                            c1[pol.name] = [(r, f) for r, f in zip(recs, figs) if f["ok"]]
                        fp, dec = summary["first_packet_ms"], summary["decoder"]
                        print(
                            f"{pol.name} @ {pace_label(rate)}, concurrency {n:3d}: {summary['utterances']} utterances, "
                            f"first packet p50 {stats.fmt(fp['p50'])} ms p99 {stats.fmt(fp['p99'])} ms, "
                            f"RTF compute p50 {stats.fmt(summary['rtf_compute']['p50'], 3)}, "
                            f"underruns {summary['underruns']}, "
                            f"frames/packet {stats.fmt(summary['frames_per_packet_mean'], 2)}, "
                            f"decoder {stats.fmt(dec['ms_per_frame'], 2)} ms/frame, load {summary['loadavg_after']}",
                            flush=True,
                        )
                        if summary["fixed_layout_mismatches"]:
                            print(
                                f"  warning: {summary['fixed_layout_mismatches']} utterance(s) not cut as {pol.name} "
                                "(did the server take the packet flags?)",
                                flush=True,
                            )
            finally:
                server.stop()

    main_sweep = result["sweeps"][0]
    # the main sweep, as the result's levels always were (raw utterances in "sweeps")
    result["levels"] = [{k: v for k, v in lv.items() if k != "utterances_raw"} for lv in main_sweep["levels"]]
    phases["sweep"] = round(time.perf_counter() - t_run, 1)

    # (b) the official package, same texts, same checkpoint, right after
    main_c1 = c1.get(main_policy.name, [])
    c1_texts = list(dict.fromkeys((r.language, r.text) for r, _ in main_c1))
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

    # (c) our frames, decoded the peers' way, per policy
    runs = [(p, c1[p.name]) for p in policies if c1.get(p.name)]
    if a.peers and runs:
        load0 = loadavg()
        by_policy = peers_decode(a, model, ref_wav, runs)
        for v in by_policy.values():
            v["loadavg_before"], v["loadavg_after"] = load0, loadavg()
        baselines["peers_decode_by_policy"] = by_policy
        if main_policy.name in by_policy:
            baselines["peers_decode"] = by_policy[main_policy.name]
        print(f"peers' decode timed, load {loadavg()}", flush=True)
    phases["peers"] = round(time.perf_counter() - t_run - phases["sweep"] - phases["official"], 1)
    result["baselines"] = baselines
    result["comparison"] = comparison(main_c1, baselines)
    result["policy_comparison"] = policy_comparison(result)
    result["official_comparison"] = official_comparison(result)
    result["conditions"]["loadavg_end"] = loadavg()
    result["conditions"]["wall_s"] = round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1)

    (out / "bench.json").write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    render(out)
    print((out / "bench.md").read_text())
    return out


# ---------------------------------------------------------------------- comparisons


def sweeps_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The result's sweeps; a result of before packet policies (only ``levels``) is one."""
    if result.get("sweeps"):
        return list(result["sweeps"])
    s = result.get("settings", {})
    name = f"fixed{s.get('packet_frames', 1)}"
    rate = s.get("tokens_per_second", 30.0)
    levels = [{"policy": name, "tokens_per_second": rate, **lv} for lv in result.get("levels", [])]
    return [{"policy": name, "tokens_per_second": rate, "pace": pace_label(rate), "levels": levels}]


def comparison(
    c1: list[tuple[UtteranceRecord, dict[str, Any]]], baselines: dict[str, Any]
) -> list[dict[str, Any]]:
    """Rows of the side-by-side table at concurrency 1 (the main policy and pace), with
    ratios to (a)."""
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


def policy_comparison(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per text pace: every policy against the reference policy, per concurrency level."""
    sweeps = sweeps_of(result)
    ref = result.get("settings", {}).get("reference_policy") or sweeps[0]["policy"]
    out = []
    for rate in dict.fromkeys(s["tokens_per_second"] for s in sweeps):
        levels = [lv for s in sweeps if s["tokens_per_second"] == rate for lv in s["levels"]]
        rows = stats.policy_ratio_rows(levels, ref)
        if rows:
            out.append({"tokens_per_second": rate, "pace": pace_label(rate), "reference": ref, "rows": rows})
    return out


def official_comparison(result: dict[str, Any]) -> list[dict[str, Any]]:
    """At concurrency 1, every (policy, pace) against the official package (b): its first
    audio and its RTF, p50 over p50."""
    off = (result.get("baselines") or {}).get("official") or {}
    if not off.get("runs"):
        return []
    o_fp = stats.percentile([1000 * r["total_s"] for r in off["runs"]], 50)
    o_rtf = stats.percentile([r["rtf"] for r in off["runs"]], 50)
    rows = []
    for s in sweeps_of(result):
        lv = next((x for x in s["levels"] if x["concurrency"] == 1 and x["utterances"]), None)
        if lv is None:
            continue
        fp, rtf = lv["first_packet_ms"]["p50"], lv["rtf_compute"]["p50"]
        row: dict[str, Any] = {
            "policy": s["policy"],
            "tokens_per_second": s["tokens_per_second"],
            "first_packet_ms_p50": fp,
            "rtf_compute_p50": rtf,
            "official_first_audio_ms_p50": o_fp,
            "official_rtf_p50": o_rtf,
            "ratio_rtf_to_official": stats.ratio(rtf, o_rtf),
            "ratio_first_packet_to_official": stats.ratio(fp, o_fp),
        }
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- the report


def markdown(result: dict[str, Any]) -> str:
    c, s = result["conditions"], result["settings"]
    sweeps = sweeps_of(result)
    names = list(dict.fromkeys(sw["policy"] for sw in sweeps))
    paces = list(dict.fromkeys(sw["tokens_per_second"] for sw in sweeps))
    pol_text = ", ".join(
        f"{p['name']} ({p['frames']} frames per later packet)"
        if p["kind"] == "fixed"
        else f"{p['name']} (later packets grow up to {p['frames']} frames while the listener is ahead)"
        for p in s.get("packet_policies")
        or [{"name": names[0], "kind": "fixed", "frames": s.get("packet_frames", 1)}]
    )
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
        f"at most {s['text_tokens_per_utterance_at_most']} text tokens per utterance, one delta per token, text pace "
        f"{' and '.join(pace_label(r) for r in paces)}; {s['rounds']} utterances per client; "
        f"first packet {s['first_packet_frames']} frame(s), then packet policy {pol_text}; "
        "one server per policy, run one after the other.",
        "",
        "## (a) the server under N concurrent streams, per packet policy (client side)",
        "",
    ]
    for rate in paces:
        lvs = [lv for sw in sweeps if sw["tokens_per_second"] == rate for lv in sw["levels"]]
        lines += [f"### Text pace: {pace_label(rate)}", "", stats.policy_table(lvs), ""]
    lines += [
        "First packet: first text delta written -> first audio byte read (client side). RTF compute: "
        "the server's compute time of the utterance (each engine tick's time shared among the "
        "utterances stepped in it) / its audio time: the cost of one stream. RTF wall: first delta -> "
        "last audio byte, over the audio: above 1 the listener waits. Underruns: packets that arrived "
        "after the audio before them had finished playing (playback starting at the first packet); "
        "stall: the silence they caused. Packets per utterance and frames per packet: as they arrived "
        "(client) and the server's `qwen3tts_packet_frames` histogram; decoder ms per frame and frames "
        "per call: the server's decoder counters over the level (n/a: this server has no such counters).",
        "",
    ]
    mism = [
        (lv["policy"], lv["tokens_per_second"], lv["concurrency"], lv["fixed_layout_mismatches"])
        for sw in sweeps
        for lv in sw["levels"]
        if lv.get("fixed_layout_mismatches")
    ]
    for pol, rate, n, k in mism:
        lines.append(
            f"* **{pol}, text pace {pace_label(rate)}, concurrency {n}: {k} utterance(s) not cut as {pol}.**"
        )
    if mism:
        lines.append("")
    for pc in result.get("policy_comparison") or []:
        lines += [
            f"## Packet policies side by side, text pace {pc['pace']} (ratios to {pc['reference']}, same run)",
            "",
            stats.policy_ratio_table(pc["rows"]),
            "",
        ]
    if len(paces) > 1:
        cells = [{"pace": pace_label(lv["tokens_per_second"]), **lv} for sw in sweeps for lv in sw["levels"]]
        lines += [
            "## Underruns by text pace",
            "",
            stats.pace_table(cells, [pace_label(r) for r in paces]),
            "",
            "All at once: every text delta written as fast as the call takes them (the text is never "
            "what the speech waits for); at an LLM's pace the talker may wait for the next token.",
            "",
        ]
    if result.get("official_comparison"):
        lines += [
            "## Against the official package at concurrency 1",
            "",
            "| policy | text pace | first packet p50 (ms) | RTF compute p50 | official first audio p50 (ms) "
            "| official RTF p50 | RTF / official | first packet / official |",
            "|" + "---|" * 8,
        ]
        for r in result["official_comparison"]:
            lines.append(
                f"| {r['policy']} | {pace_label(r['tokens_per_second'])} | {stats.fmt(r['first_packet_ms_p50'])} "
                f"| {stats.fmt(r['rtf_compute_p50'], 3)} | {stats.fmt(r['official_first_audio_ms_p50'])} "
                f"| {stats.fmt(r['official_rtf_p50'], 3)} | {stats.fmt(r['ratio_rtf_to_official'], 2)} "
                f"| {stats.fmt(r['ratio_first_packet_to_official'], 3)} |"
            )
        lines.append("")
    if result.get("comparison"):
        lines += [
            f"## Side by side at concurrency 1, {sweeps[0]['policy']}, text pace {sweeps[0]['pace']} "
            "(same checkpoint, same texts, same run)",
            "",
            stats.comparison_table(result["comparison"]),
            "",
            "(b) does not stream: nothing is heard before its generate + decode returns. (c) is "
            "(a)'s first packet with our decode of that packet replaced by the peers' re-decode "
            "of it, and (a)'s compute with every packet decoded that way.",
            "",
        ]
        off = result["baselines"].get("official", {})
        if off.get("error"):
            lines += [f"* (b) failed: {off['error'][:300]}", ""]
    by_policy = (result.get("baselines") or {}).get("peers_decode_by_policy")
    if by_policy is None and (result.get("baselines") or {}).get("peers_decode"):
        by_policy = {sweeps[0]["policy"]: result["baselines"]["peers_decode"]}
    if by_policy:
        lines += [
            f"## (c) the peers' decode per policy, concurrency 1, text pace {sweeps[0]['pace']}",
            "",
            "Our frames decoded in the packets the server sent (frame ranges observed on the wire), "
            f"ours and with {PEER_LEFT_CONTEXT} frames of left context re-decoded per packet.",
            "",
        ]
        rtf_a = {
            sw["policy"]: next(
                (lv["rtf_compute"]["p50"] for lv in sw["levels"] if lv["concurrency"] == 1), math.nan
            )
            for sw in sweeps
            if sw["tokens_per_second"] == sweeps[0]["tokens_per_second"]
        }
        for name, peers in by_policy.items():
            us = peers.get("utterances") or []
            if us:
                rtf_c = stats.percentile([u["rtf"] for u in us], 50)
                fp_c = stats.percentile([u["first_packet_ms"] for u in us], 50)
                lines.append(
                    f"* **{name}**: (c) first packet p50 {stats.fmt(fp_c)} ms, RTF p50 {stats.fmt(rtf_c, 3)} "
                    f"({stats.fmt(stats.ratio(rtf_c, rtf_a.get(name, math.nan)), 2)}x (a)'s)."
                )
            for key, e in peers.get("per_text", {}).items():
                same = e.get("same_audio_as_server")
                check = (
                    f"offline frames = server's audio to {same['max_abs_diff_int16']} LSB; " if same else ""
                )
                lines.append(
                    f"  * `{key.split('|', 1)[1][:40]}`: {e['frames']} frames, {e['packets']} packets; {check}"
                    f"decode per packet p50 ours {stats.fmt(stats.percentile(e['ours_decode_ms'], 50), 1)} ms, "
                    f"peers' {stats.fmt(stats.percentile(e['peers_decode_ms'], 50), 1)} ms"
                    + (
                        ""
                        if e["decode_timed_on"] == key
                        else " (same packet layout: timed once, on another text)"
                    )
                )
            st = peers.get("steady_state")
            if st:
                lines.append(
                    f"  * Long utterances (every packet with its full {PEER_LEFT_CONTEXT} frames of context): "
                    f"decode per {st['packet_frames']}-frame packet"
                    + (
                        f" (the {st['packet_frames_from']} it sent)"
                        if st.get("packet_frames_from", "policy") != "policy"
                        else ""
                    )
                    + f" ours {st['ours_decode_ms']:.1f} ms, peers' "
                    f"{st['peers_decode_full_context_ms']:.1f} ms ({st['ratio']:.1f}x); (c)'s RTF would be "
                    f"{st['rtf_c_long_utterances_p50']:.3f}"
                    f" ({stats.ratio(st['rtf_c_long_utterances_p50'], rtf_a.get(name, math.nan)):.2f}x (a))."
                )
            for why in peers.get("skipped") or []:
                lines.append(f"  * not timed: {why}")
        lines.append("")
    lines += ["## Details per policy and text pace", ""]
    for sw in sweeps:
        lines += [
            f"### {sw['policy']}, text pace {sw['pace']}",
            "",
            stats.concurrency_table(sw["levels"]),
            "",
        ]
    lines.append(
        "Server first packet: the first packet as the server measured it (first text in -> first audio "
        "written); gaps: between consecutive audio packets of an utterance."
    )
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
    ap.add_argument(
        "--tokens-per-second", type=float, default=30.0, help="text deltas per second (without --text-pace)"
    )
    ap.add_argument(
        "--text-pace",
        help="text paces to sweep, tokens (deltas) per second, comma-separated; 0 or 'all' = the whole "
        "text at once, e.g. 30,0 (default: --tokens-per-second); the first is the main one",
    )
    ap.add_argument("--max-new-tokens", type=int, help="bounds each utterance (random weights never end)")
    ap.add_argument("--sampling", default="greedy", choices=["greedy", "default"])
    ap.add_argument("--first-packet-frames", type=int, default=1)
    ap.add_argument(
        "--packets",
        help="packet policies, one server each, comma-separated: fixedN (N frames per later packet), "
        "adaptive (up to --max-packet-frames), adaptiveM (up to M), e.g. fixed1,adaptive; the first is "
        "the main one (default: fixed<--packet-frames>, i.e. fixed1)",
    )
    ap.add_argument(
        "--packet-frames", type=int, default=1, help="without --packets: the fixed policy's frames"
    )
    ap.add_argument("--max-packet-frames", type=int, default=8, help="adaptive: the most frames per packet")
    ap.add_argument("--pause-s", type=float, default=0.2, help="between a client's utterances")
    ap.add_argument("--official", action=argparse.BooleanOptionalAction, default=True, help="baseline (b)")
    ap.add_argument("--official-runs", type=int, help="runs of each text by the official package")
    ap.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True, help="baseline (c)")
    ap.add_argument(
        "--decode-repeats", type=int, default=3, help="timings of each decode (the least is kept)"
    )
    ap.add_argument(
        "--out",
        help="results folder (default: benchmarks/results/<device>-<preset>-<date>, then -<policies> "
        "unless fixed1 only, then -<paces> unless 30 tokens/s only)",
    )
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
