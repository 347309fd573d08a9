"""Per-frame cost of the engine's stages, and the streaming decoder against the peers'
way of decoding (re-decode 25 frames of left context per packet), in one run.

    .venv/bin/python -m benchmarks.engine_cost --model checkpoints/0.6b-base [--device cuda --dtype bfloat16]

Writes benchmarks/results/<device>-<preset>-<date>/engine_cost.json and prints a table.
Not a test: it measures, it does not assert.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
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
from qwen3tts_rt.model.sampling import SamplingParams

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out-root", default="benchmarks/results")
    fp = ap.add_argument_group("fast path (defaults: on for CUDA, off on CPU)")
    fp.add_argument("--static", action=argparse.BooleanOptionalAction, default=None, help="static KV cache")
    fp.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None, help="CUDA graphs")
    fp.add_argument("--attention", default="auto", choices=["auto", "sdpa", "flash"])
    fp.add_argument("--max-positions", type=int, default=EngineConfig.max_positions)
    a = ap.parse_args()
    cfg = EngineConfig(
        max_sessions=1,
        static_kv=a.static,
        cuda_graphs=a.graphs,
        attention=a.attention,
        max_positions=a.max_positions,
    )
    ckpt = load_checkpoint(a.model, device=a.device, dtype=a.dtype)
    rng = np.random.default_rng(0)
    ref = (0.1 * rng.standard_normal(24000 * 3)).astype(np.float32)
    clone = create_voice_clone_prompt(ckpt, ref, None, x_vector_only=True, sample_rate=24000)
    voice = voice_prompt(ckpt, clone=clone)
    preset = (ckpt.config.raw.get("qwen3tts_rt_random_weights") or {}).get(
        "preset", ckpt.config.tts_model_size
    )
    result = {
        "model": str(a.model),
        "preset": preset,
        "device": device_name(ckpt.model.device),
        "dtype": a.dtype,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "date": dt.date.today().isoformat(),
        "fast_path": fast_path_info(ckpt, cfg),
        "stages": stage_costs(ckpt, voice, a.frames, cfg),
        "engine": first_packet(ckpt, voice, a.runs, cfg),
    }
    out = Path(a.out_root) / f"{result['device']}-{preset}-{result['date']}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {out / 'engine_cost.json'}")


if __name__ == "__main__":
    main()
