"""The GPU fast path checked against the exact path, on a set of utterances.

    .venv/bin/python -m benchmarks.gpu_check --model checkpoints/0.6b-base --device cuda

For each case (a text; greedy decoding unless said otherwise):

* fp32: the engine (static cache, batch buckets, CUDA graphs, all cases at once) against
  ``synthesize`` one case at a time (static, eager) -> fraction of identical frames and
  the largest sample difference; with ``--cpu-cases N``, the first N cases also against the
  CPU dynamic path (the one tested against the official package);
* seeded sampling: the same seeds on the CPU and the device draw the same numbers; the
  fraction of identical frames (``--cpu-cases`` only);
* bf16 against fp32: the fraction of identical frames, the first frame that differs, and
  the largest logit difference of the talker and of the code predictor on the steps
  before it (same inputs), relative to the logits' spread;
* bf16: the engine (graphs, batched) against ``synthesize`` (eager, alone), as for fp32.

``--cases N`` checks the first N texts only, ``--max-frames`` bounds each (random weights
never emit EOS). Writes benchmarks/results/<device>-<preset>-<date>/gpu_check.json (or
``--out DIR``). On a CPU it runs the same
comparisons with the static path in place of the graphs (a self-check of this script).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.engine_cost import device_name, fast_path_info
from qwen3tts_rt.engine.engine import Engine, EngineConfig
from qwen3tts_rt.engine.messages import PcmPacket
from qwen3tts_rt.engine.synth import SynthesisResult, synthesize
from qwen3tts_rt.engine.voices import create_voice_clone_prompt, voice_prompt
from qwen3tts_rt.model.checkpoint import Checkpoint, load_checkpoint
from qwen3tts_rt.model.prompt import VoicePrompt
from qwen3tts_rt.model.sampling import SamplingParams
from qwen3tts_rt.synthetic import synthetic_speech

TEXTS = [
    "Hello! This is a check of the fast path.",
    "The quick brown fox jumps over the lazy dog.",
    "Streaming text in, one token at a time, forty-two times.",
    "Numbers like 3.14159 and 2026 should be read out too.",
    "你好，世界。这是流式合成。",
    "Could you say that again, a little slower please?",
    "Real-time speech needs a first packet within a few tens of milliseconds.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
]


def voice_for(ckpt: Checkpoint) -> VoicePrompt:
    kind = ckpt.config.tts_model_type
    if kind == "custom_voice":
        return voice_prompt(ckpt, speaker=ckpt.config.speakers[0])
    if kind == "voice_design":
        return voice_prompt(ckpt, instruct="A calm, clear voice.")
    clone = create_voice_clone_prompt(
        ckpt, synthetic_speech(3.0), None, x_vector_only=True, sample_rate=24000
    )
    return voice_prompt(ckpt, clone=clone)


def same_frames(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, int | None]:
    """(identical frames at the same index, frames compared, first differing index)."""
    n = max(len(a), len(b))
    m = min(len(a), len(b))
    eq = (a[:m] == b[:m]).all(-1)
    first = int((~eq).nonzero()[0, 0]) if not bool(eq.all()) else (m if len(a) != len(b) else None)
    return int(eq.sum()), n, first


class LogitRecorder:
    """Forward hooks on the talker's codec head and the code predictor's heads."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.talker: list[torch.Tensor] = []
        self.predictor: list[torch.Tensor] = []
        t = ckpt.model.talker
        self.handles = [t.codec_head.register_forward_hook(self._hook(self.talker))]
        for head in t.code_predictor.lm_head:
            self.handles.append(head.register_forward_hook(self._hook(self.predictor)))

    @staticmethod
    def _hook(store: list[torch.Tensor]) -> Any:
        def hook(_m: Any, _i: Any, out: torch.Tensor) -> None:
            store.append(out.detach().float().reshape(-1, out.shape[-1])[-1:].cpu())

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def engine_frames(
    ckpt: Checkpoint, voice: VoicePrompt, params: SamplingParams, texts: list[str]
) -> list[tuple[torch.Tensor, np.ndarray]]:
    """All cases at once through the engine (static KV cache; CUDA graphs on CUDA)."""
    eng = Engine(ckpt, EngineConfig(max_sessions=len(texts), static_kv=True))
    try:
        eng.warmup()
        sessions = []
        for text in texts:
            s = eng.open_session(voice, "auto", params)
            s.push_text(text)
            s.end_text()
            sessions.append(s)
        out = []
        for s in sessions:
            packets = [m for m in s.messages(timeout=600) if isinstance(m, PcmPacket)]
            out.append(
                (
                    torch.from_numpy(np.concatenate([p.codes for p in packets])),
                    np.concatenate([p.pcm for p in packets]),
                )
            )
        return out
    finally:
        eng.shutdown()


def compare(
    alone: list[tuple[torch.Tensor, np.ndarray]], batched: list[tuple[torch.Tensor, np.ndarray]]
) -> dict[str, Any]:
    """Frames and samples of two runs of the same cases."""
    eq = [same_frames(a[0], b[0]) for a, b in zip(alone, batched)]
    pcm = [
        float(np.abs(a[1][: len(b[1])] - b[1][: len(a[1])]).max(initial=0.0)) for a, b in zip(alone, batched)
    ]
    return {
        "identical_frames": sum(e[0] for e in eq),
        "frames": sum(e[1] for e in eq),
        "first_differing_frame_per_case": [e[2] for e in eq],
        "max_abs_sample_diff": max(pcm, default=0.0),
    }


def logit_error(recs: tuple[LogitRecorder, LogitRecorder], upto: int, groups: int) -> tuple[float, float]:
    """Largest |logit difference| / logit std of the talker and of the code predictor on
    the steps before frame ``upto`` (the same inputs reached both models)."""
    errs = []
    for name, k in (("talker", upto + 1), ("predictor", upto * groups)):
        xs, ys = getattr(recs[0], name)[:k], getattr(recs[1], name)[:k]
        if not xs:
            errs.append(0.0)
            continue
        x, y = torch.cat(xs), torch.cat(ys)
        errs.append(float(((x - y).abs().max(-1).values / x.std(-1)).max()))
    return errs[0], errs[1]


def recorded_synthesis(
    ckpt: Checkpoint, voice: VoicePrompt, texts: list[str], params: SamplingParams
) -> tuple[list[SynthesisResult], list[LogitRecorder]]:
    """``synthesize`` each text alone (eager), recording the logits."""
    results, recs = [], []
    for t in texts:
        rec = LogitRecorder(ckpt)
        try:
            results.append(synthesize(ckpt, voice, t, "auto", params))
        finally:
            rec.close()
        recs.append(rec)
    return results, recs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-frames", type=int, default=60)
    ap.add_argument("--cases", type=int, default=len(TEXTS), help=f"texts to check (1..{len(TEXTS)})")
    ap.add_argument("--cpu-cases", type=int, default=0, help="cases also run on the CPU (slow for 0.6B+)")
    ap.add_argument("--skip-bf16", action="store_true")
    ap.add_argument("--out-root", default="benchmarks/results")
    ap.add_argument("--out", help="exact results folder (default: OUT_ROOT/<device>-<preset>-<date>)")
    a = ap.parse_args(argv)
    if not 1 <= a.cases <= len(TEXTS) or a.max_frames < 1 or a.cpu_cases < 0:
        ap.error(f"need 1 <= --cases <= {len(TEXTS)}, --max-frames >= 1 and --cpu-cases >= 0")
    texts = TEXTS[: a.cases]
    greedy = SamplingParams.greedy(max_new_tokens=a.max_frames + 1)
    sampled = SamplingParams(max_new_tokens=a.max_frames + 1)
    f32 = load_checkpoint(a.model, device=a.device, dtype="float32")
    voice = voice_for(f32)
    groups = f32.config.talker.num_code_groups - 1
    seconds: dict[str, float] = {}
    result: dict[str, Any] = {
        "model": a.model,
        "device": device_name(f32.model.device),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "date": dt.date.today().isoformat(),
        "fast_path": fast_path_info(f32),
        "cases": len(texts),
        "max_frames": a.max_frames,
        "seconds": seconds,
    }
    # --- fp32: engine (graphs, batched) vs synthesize (eager, alone)
    t0 = time.perf_counter()
    alone, f32_recs = recorded_synthesis(f32, voice, texts, greedy)
    batched = engine_frames(f32, voice, greedy, texts)
    result["fp32_engine_vs_synthesize"] = compare([(r.frames, r.wav) for r in alone], batched)
    seconds["fp32"] = time.perf_counter() - t0
    # --- against the CPU dynamic path (greedy and seeded)
    if a.cpu_cases:
        t0 = time.perf_counter()
        cpu = load_checkpoint(a.model)
        cvoice = voice_for(cpu)
        n = min(a.cpu_cases, len(texts))
        rows = {}
        for name, params, seed in (("greedy", greedy, None), ("seeded", sampled, 1234)):
            got = [synthesize(f32, voice, t, "auto", params, seed=seed).frames for t in texts[:n]]
            ref = [synthesize(cpu, cvoice, t, "auto", params, seed=seed).frames for t in texts[:n]]
            eq = [same_frames(x, y) for x, y in zip(got, ref)]
            rows[name] = {"identical_frames": sum(e[0] for e in eq), "frames": sum(e[1] for e in eq)}
        result["fp32_device_vs_cpu"] = rows
        del cpu, cvoice
        seconds["cpu"] = time.perf_counter() - t0
    # --- bf16 vs fp32 (eager: logits recorded on the same inputs until frames diverge),
    # --- and bf16 engine (graphs, batched) vs bf16 synthesize (eager, alone)
    if not a.skip_bf16:
        t0 = time.perf_counter()
        bf = load_checkpoint(a.model, device=a.device, dtype="bfloat16")
        bvoice = voice_for(bf)
        balone, bf_recs = recorded_synthesis(bf, bvoice, texts, greedy)
        talker_err, pred_err, ident, total, firsts = 0.0, 0.0, 0, 0, []
        for r32, r16, recs in zip(alone, balone, zip(f32_recs, bf_recs)):
            same, n, first = same_frames(r32.frames, r16.frames)
            ident, total = ident + same, total + n
            firsts.append(first)
            t_err, p_err = logit_error(recs, len(r32.frames) if first is None else first, groups)
            talker_err, pred_err = max(talker_err, t_err), max(pred_err, p_err)
        result["bf16_vs_fp32"] = {
            "identical_frames": ident,
            "frames": total,
            "fraction": ident / max(total, 1),
            "first_differing_frame_per_case": firsts,
            "talker_max_logit_diff_over_std": talker_err,
            "predictor_max_logit_diff_over_std": pred_err,
        }
        bbatched = engine_frames(bf, bvoice, greedy, texts)
        result["bf16_engine_vs_synthesize"] = compare([(r.frames, r.wav) for r in balone], bbatched)
        seconds["bf16"] = time.perf_counter() - t0
    preset = (f32.config.raw.get("qwen3tts_rt_random_weights") or {}).get("preset", f32.config.tts_model_size)
    result["preset"] = preset
    out = Path(a.out) if a.out else Path(a.out_root) / f"{result['device']}-{preset}-{result['date']}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
