"""Per-frame cost of the engine's stages, and the streaming decoder against the peers'
way of decoding (re-decode 25 frames of left context per packet), in one run.

    .venv/bin/python -m benchmarks.engine_cost --model checkpoints/0.6b-base [--device cuda --dtype bfloat16]

Writes benchmarks/results/<device>-<preset>-<date>/engine_cost.json and prints a table.
``--variants bfloat16:graphs,bfloat16:eager,float32:graphs`` measures several dtypes and
fast-path modes in one process (one checkpoint load per dtype), one file each:
``engine_cost-<dtype>-<mode>.json`` (what ``benchmarks/gpu_run.py`` runs).
Not a test: it measures, it does not assert.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import math
import platform
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks.decode_cost import (
    PEER_LEFT_CONTEXT,
    pool_decode_costs,
    redecode_costs,
    streaming_decode_costs,
)
from benchmarks.decode_cost import sync as _sync
from qwen3tts_rt.engine.engine import Engine, EngineConfig
from qwen3tts_rt.engine.generation import FrameGenerator, Phase
from qwen3tts_rt.engine.messages import PcmPacket, UtteranceDone
from qwen3tts_rt.engine.synth import new_utterance
from qwen3tts_rt.engine.voices import create_voice_clone_prompt, voice_prompt
from qwen3tts_rt.model.checkpoint import Checkpoint, load_checkpoint
from qwen3tts_rt.model.decoder_pool import DecoderPool
from qwen3tts_rt.model.layers import attention_backend
from qwen3tts_rt.model.prompt import VoicePrompt
from qwen3tts_rt.model.sampling import SamplingParams
from qwen3tts_rt.synthetic import synthetic_speech

TEXT = "Hello! This is a benchmark of the streaming engine, speaking while the text still arrives."


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev).replace(" ", "-")
    return f"cpu-{torch.get_num_threads()}threads"


def stage_costs(ckpt: Checkpoint, voice, frames: int, cfg: EngineConfig) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Median ms per frame of: talker step, code predictor (15 steps), streaming decoder
    step, and re-decoding 25 frames of left context + 1 new frame. The talker and code
    predictor run as the engine runs them (on CUDA: static cache, captured graphs); the
    decoder is timed both plain (``decode_step``) and as the engine's slot pool step."""
    dev = ckpt.model.device
    params = SamplingParams.greedy(max_new_tokens=frames + 2)
    st = new_utterance(ckpt, voice, "english", params, seed=None, slot=0)
    st.sched.push(ckpt.tokenizer.text_ids(TEXT))
    st.sched.end()
    fast = cfg.fast_path(dev)
    gen = FrameGenerator(ckpt.model, slots=1, fast=fast)
    gen.warmup()  # CUDA graphs (no-op on CPU)
    gen.tick([st])  # prefill + first frame
    talker, predictor = [], []
    codes: list[torch.Tensor] = []
    while st.phase is not Phase.DONE and len(codes) < frames:
        _sync(dev)
        t0 = time.perf_counter()
        gen._advance([st])
        _sync(dev)
        t1 = time.perf_counter()
        if st.c0 == gen._eos:
            break
        codes.extend(frame for _, frame in gen._complete_frames([st]))
        _sync(dev)
        t2 = time.perf_counter()
        talker.append(t1 - t0)
        predictor.append(t2 - t1)
    dec = ckpt.codec.decoder
    cdev = ckpt.codec.device
    seq = torch.stack(codes).to(cdev)  # [T, G]
    pool = DecoderPool(dec, 1, fast, cdev, ckpt.codec.dtype)
    pool.warmup()
    singles = [(i, i + 1) for i in range(len(seq))]
    pooled = pool_decode_costs(pool, seq, singles)
    stream = streaming_decode_costs(dec, seq, singles, ckpt.codec.dtype)
    redecode = redecode_costs(dec, seq, singles)[PEER_LEFT_CONTEXT:]  # full context only
    ms = lambda xs: 1000 * statistics.median(xs)  # noqa: E731
    return {
        "frames_measured": len(codes),
        "talker_step_ms": ms(talker),
        "code_predictor_15_steps_ms": ms(predictor),
        "decoder_streaming_step_ms": ms(stream),
        "decoder_pool_step_ms": ms(pooled),
        "decoder_redecode_25_left_context_ms": ms(redecode) if redecode else float("nan"),
        "redecode_over_streaming_ratio": (ms(redecode) / ms(stream)) if redecode else float("nan"),
        "frame_total_streaming_ms": ms(talker) + ms(predictor) + ms(stream),
        "frame_total_engine_ms": ms(talker) + ms(predictor) + ms(pooled),
        "frame_audio_ms": 80.0,
    }


def first_packet(ckpt: Checkpoint, voice, runs: int, cfg: EngineConfig) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Time from the first text delta to the first PCM packet through the engine (the
    session is opened first, so the text-independent prefix is already prefilled)."""
    eng = Engine(ckpt, cfg)
    lat = []
    try:
        eng.warmup()
        for _ in range(runs):
            s = eng.open_session(voice, "english", SamplingParams.greedy(max_new_tokens=3))
            time.sleep(0.5)  # let the prefix prefill finish, as on a live call
            s.push_text("Hello ")  # one LLM-sized delta...
            s.push_text("there, ")  # ...and the next, which makes "Hello" final
            s.end_text()
            for m in s.messages(timeout=600):
                if isinstance(m, UtteranceDone) and m.first_packet_latency_s is not None:
                    lat.append(m.first_packet_latency_s)
                if isinstance(m, PcmPacket):
                    continue
    finally:
        eng.shutdown()
    return {"first_packet_ms_p50": 1000 * statistics.median(lat), "runs": len(lat)}


def fast_path_info(ckpt: Checkpoint, cfg: EngineConfig | None = None) -> dict[str, object]:
    fast = (cfg or EngineConfig()).fast_path(ckpt.model.device)
    backend = (
        attention_backend(ckpt.model.device, ckpt.model.dtype, fast.attention) if fast.static else "sdpa"
    )
    return {**fast.__dict__, "attention_backend": backend}


VARIANT_MODES = ("graphs", "eager", "dynamic")


def variant_config(mode: str, base: EngineConfig) -> EngineConfig:
    """``graphs``: static KV cache + CUDA graphs (the CUDA default; off CUDA, graphs are
    never used and the default is the dynamic path); ``eager``: static KV cache, steps run
    eagerly; ``dynamic``: growing KV cache, batches of exactly the ready rows."""
    if mode not in VARIANT_MODES:
        raise ValueError(f"unknown mode {mode!r}: one of {', '.join(VARIANT_MODES)}")
    static, graphs = {"graphs": (None, True), "eager": (True, False), "dynamic": (False, False)}[mode]
    return dataclasses.replace(base, static_kv=static, cuda_graphs=graphs)


def parse_variants(text: str) -> list[tuple[str, str]]:
    """``bfloat16:graphs,float32:eager`` -> [(dtype, mode), ...]."""
    out = []
    for item in text.split(","):
        dtype, _, mode = item.strip().partition(":")
        if dtype not in DTYPES or mode not in VARIANT_MODES:
            raise ValueError(
                f"bad variant {item!r}: DTYPE:MODE with DTYPE one of {', '.join(DTYPES)} "
                f"and MODE one of {', '.join(VARIANT_MODES)}"
            )
        out.append((dtype, mode))
    return out


DTYPES = ("float32", "bfloat16", "float16")


def measure(
    ckpt: Checkpoint, voice: VoicePrompt, cfg: EngineConfig, *, model: str, dtype: str, frames: int, runs: int
) -> dict[str, object]:
    """One engine_cost result: the stage costs and the engine's first packet under ``cfg``."""
    preset = (ckpt.config.raw.get("qwen3tts_rt_random_weights") or {}).get(
        "preset", ckpt.config.tts_model_size
    )
    stages = stage_costs(ckpt, voice, frames, cfg)
    return {
        "model": model,
        "preset": preset,
        "device": device_name(ckpt.model.device),
        "dtype": dtype,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "date": dt.date.today().isoformat(),
        "fast_path": fast_path_info(ckpt, cfg),
        "stages": stages,
        "rtf_compute_engine": stages["frame_total_engine_ms"] / stages["frame_audio_ms"],
        "engine": first_packet(ckpt, voice, runs, cfg),
    }


def load_with_voice(model: str, device: str, dtype: str) -> tuple[Checkpoint, VoicePrompt]:
    ckpt = load_checkpoint(model, device=device, dtype=dtype)
    clone = create_voice_clone_prompt(
        ckpt, synthetic_speech(3.0), None, x_vector_only=True, sample_rate=24000
    )
    return ckpt, voice_prompt(ckpt, clone=clone)


def write_result(out: Path, name: str, result: dict[str, object]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=DTYPES)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out-root", default="benchmarks/results")
    ap.add_argument("--out", help="exact results folder (default: OUT_ROOT/<device>-<preset>-<date>)")
    ap.add_argument(
        "--variants",
        help="several runs in one process, one file each (engine_cost-DTYPE-MODE.json): e.g. "
        "bfloat16:graphs,bfloat16:eager,float32:graphs (MODE: graphs, eager or dynamic; "
        "overrides --dtype, --static and --graphs)",
    )
    fp = ap.add_argument_group("fast path (defaults: on for CUDA, off on CPU)")
    fp.add_argument("--static", action=argparse.BooleanOptionalAction, default=None, help="static KV cache")
    fp.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None, help="CUDA graphs")
    fp.add_argument("--attention", default="auto", choices=["auto", "sdpa", "flash"])
    fp.add_argument("--max-positions", type=int, default=EngineConfig.max_positions)
    a = ap.parse_args(argv)
    if a.frames < 2 or a.runs < 1:
        ap.error("--frames must be >= 2 and --runs >= 1")
    cfg = EngineConfig(
        max_sessions=1,
        static_kv=a.static,
        cuda_graphs=a.graphs,
        attention=a.attention,
        max_positions=a.max_positions,
    )
    if not a.variants:
        ckpt, voice = load_with_voice(a.model, a.device, a.dtype)
        result = measure(ckpt, voice, cfg, model=str(a.model), dtype=a.dtype, frames=a.frames, runs=a.runs)
        out = (
            Path(a.out)
            if a.out
            else Path(a.out_root) / f"{result['device']}-{result['preset']}-{result['date']}"
        )
        path = write_result(out, "engine_cost.json", result)
        print(json.dumps(result, indent=2))
        print(f"written to {path}")
        return
    try:
        variants = parse_variants(a.variants)
    except ValueError as e:
        ap.error(str(e))
    failed = []
    for dtype in dict.fromkeys(d for d, _ in variants):  # one load per dtype, in the order given
        ckpt, voice = load_with_voice(a.model, a.device, dtype)
        for mode in [m for d, m in variants if d == dtype]:
            name = f"engine_cost-{dtype}-{mode}.json"
            try:
                result = measure(
                    ckpt,
                    voice,
                    variant_config(mode, cfg),
                    model=str(a.model),
                    dtype=dtype,
                    frames=a.frames,
                    runs=a.runs,
                )
            except Exception as e:  # one variant's failure is recorded, the others still run
                traceback.print_exc()
                failed.append(name)
                result = {
                    "model": str(a.model),
                    "dtype": dtype,
                    "mode": mode,
                    "error": f"{type(e).__name__}: {e}",
                }
            result["mode"] = mode
            out = (
                Path(a.out)
                if a.out
                else Path(a.out_root)
                / "{}-{}-{}".format(
                    result.get("device", device_name(ckpt.model.device)),
                    result.get("preset", ckpt.config.tts_model_size),
                    dt.date.today().isoformat(),
                )
            )
            path = write_result(out, name, result)
            stages: dict[str, Any] = result.get("stages") or {}  # type: ignore[assignment]
            engine: dict[str, Any] = result.get("engine") or {}  # type: ignore[assignment]
            print(
                f"{dtype:9s} {mode:8s} frame (engine) {stages.get('frame_total_engine_ms', math.nan):8.2f} ms, "
                f"first packet p50 {engine.get('first_packet_ms_p50', math.nan):8.2f} ms -> {path}",
                flush=True,
            )
        del ckpt, voice
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if failed:
        raise SystemExit(f"variants failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
