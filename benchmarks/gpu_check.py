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
  before it (same inputs), relative to the logits' spread.

Writes benchmarks/results/<device>-<preset>-<date>/gpu_check.json. On a CPU it runs the same
comparisons with the static path in place of the graphs (a self-check of this script).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
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
    ref = (0.1 * np.random.default_rng(0).standard_normal(24000 * 3)).astype(np.float32)
    clone = create_voice_clone_prompt(ckpt, ref, None, x_vector_only=True, sample_rate=24000)
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
    ckpt: Checkpoint, voice: VoicePrompt, params: SamplingParams, seeds: list[int | None]
) -> list[tuple[torch.Tensor, np.ndarray]]:
    """All cases at once through the engine (graphs on CUDA)."""
    eng = Engine(ckpt, EngineConfig(max_sessions=len(TEXTS), static_kv=True))
    try:
        eng.warmup()
        sessions = []
        for text, seed in zip(TEXTS, seeds):
            s = eng.open_session(voice, "auto", params, seed=seed)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-frames", type=int, default=60)
    ap.add_argument("--cpu-cases", type=int, default=0, help="cases also run on the CPU (slow for 0.6B+)")
    ap.add_argument("--skip-bf16", action="store_true")
    ap.add_argument("--out-root", default="benchmarks/results")
    a = ap.parse_args()
    greedy = SamplingParams.greedy(max_new_tokens=a.max_frames + 1)
    sampled = SamplingParams(max_new_tokens=a.max_frames + 1)
    f32 = load_checkpoint(a.model, device=a.device, dtype="float32")
    voice = voice_for(f32)
    result: dict[str, Any] = {
        "model": a.model,
        "device": device_name(f32.model.device),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "date": dt.date.today().isoformat(),
        "fast_path": fast_path_info(f32),
        "cases": len(TEXTS),
    }
    # --- fp32: engine (graphs, batched) vs synthesize (eager, alone)
    alone = [synthesize(f32, voice, t, "auto", greedy) for t in TEXTS]
    batched = engine_frames(f32, voice, greedy, [None] * len(TEXTS))
    eq = [same_frames(r.frames, f) for r, (f, _) in zip(alone, batched)]
    pcm_diff = max(
        float(np.abs(r.wav[: len(w)] - w[: len(r.wav)]).max()) for r, (_, w) in zip(alone, batched)
    )
    result["fp32_engine_vs_synthesize"] = {
        "identical_frames": sum(e[0] for e in eq),
        "frames": sum(e[1] for e in eq),
        "max_abs_sample_diff": pcm_diff,
    }
    # --- against the CPU dynamic path (greedy and seeded)
    if a.cpu_cases:
        cpu = load_checkpoint(a.model)
        cvoice = voice_for(cpu)
        n = min(a.cpu_cases, len(TEXTS))
        rows = {}
        for name, params, seed in (("greedy", greedy, None), ("seeded", sampled, 1234)):
            got = [synthesize(f32, voice, t, "auto", params, seed=seed).frames for t in TEXTS[:n]]
            ref = [synthesize(cpu, cvoice, t, "auto", params, seed=seed).frames for t in TEXTS[:n]]
            eq = [same_frames(x, y) for x, y in zip(got, ref)]
            rows[name] = {"identical_frames": sum(e[0] for e in eq), "frames": sum(e[1] for e in eq)}
        result["fp32_device_vs_cpu"] = rows
    # --- bf16 vs fp32 (eager: logits recorded on the same inputs until frames diverge)
    if not a.skip_bf16:
        bf = load_checkpoint(a.model, device=a.device, dtype="bfloat16")
        bvoice = voice_for(bf)
        talker_err, pred_err, ident, total, firsts = 0.0, 0.0, 0, 0, []
        for t in TEXTS:
            recs = []
            res: list[SynthesisResult] = []
            for ck, v in ((f32, voice), (bf, bvoice)):
                rec = LogitRecorder(ck)
                res.append(synthesize(ck, v, t, "auto", greedy))
                rec.close()
                recs.append(rec)
            same, n, first = same_frames(res[0].frames, res[1].frames)
            ident, total = ident + same, total + n
            firsts.append(first)
            upto = len(res[0].frames) if first is None else first
            groups = f32.config.talker.num_code_groups - 1
            for name, k in (("talker", upto + 1), ("predictor", upto * groups)):
                xs, ys = getattr(recs[0], name)[:k], getattr(recs[1], name)[:k]
                if not xs:
                    continue
                x, y = torch.cat(xs), torch.cat(ys)
                err = float(((x - y).abs().max(-1).values / x.std(-1)).max())
                if name == "talker":
                    talker_err = max(talker_err, err)
                else:
                    pred_err = max(pred_err, err)
        result["bf16_vs_fp32"] = {
            "identical_frames": ident,
            "frames": total,
            "fraction": ident / max(total, 1),
            "first_differing_frame_per_case": firsts,
            "talker_max_logit_diff_over_std": talker_err,
            "predictor_max_logit_diff_over_std": pred_err,
        }
    preset = (f32.config.raw.get("qwen3tts_rt_random_weights") or {}).get("preset", f32.config.tts_model_size)
    out = Path(a.out_root) / f"{result['device']}-{preset}-{result['date']}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
