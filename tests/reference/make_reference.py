"""Run the OFFICIAL qwen-tts package on tiny random checkpoints and save what it
produces: greedy codec frames, waveforms, speaker embeddings, reference codes.

Every case runs in both official layouts: ``<case>_whole`` (``non_streaming_mode=True``,
the default of ``generate_custom_voice`` and ``generate_voice_design``) and
``<case>_dual`` (``non_streaming_mode=False``, the default of ``generate_voice_clone``).

Runs in the reference venv (see run_reference.sh), never imports qwen3tts_rt.
Usage: make_reference.py CHECKPOINT_ROOT OUT_DIR
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
import transformers

# sox, onnxruntime and torchaudio are imported by the official 25 Hz tokenizer only
# (stubbed after transformers has looked for the real ones).
for _name in ("sox", "onnxruntime", "torchaudio", "torchaudio.compliance", "torchaudio.compliance.kaldi"):
    _mod = types.ModuleType(_name)
    _mod.__spec__ = importlib.machinery.ModuleSpec(_name, None)
    sys.modules.setdefault(_name, _mod)

from qwen_tts import Qwen3TTSModel  # noqa: E402

GREEDY = dict(do_sample=False, subtalker_dosample=False, max_new_tokens=20)
LAYOUTS = {"whole": True, "dual": False}  # case-name suffix: non_streaming_mode
EN = "Hello! This is a streaming test, one token at a time."
ZH = "你好，这是一个流式语音合成的测试。"
EN_LONG = (
    "The quick brown fox jumps over the lazy dog while the streaming engine keeps speaking, "
    "one text token for every eighty milliseconds of audio."
)
REF_TEXT = "Hello there, my name is Tiny."

CASES = [
    # name, checkpoint, method, kwargs
    ("custom_en", "tiny-custom", "custom", dict(text=EN, language="english", speaker="vivian")),
    ("custom_zh", "tiny-custom", "custom", dict(text=ZH, language="chinese", speaker="serena")),
    ("custom_dialect", "tiny-custom", "custom", dict(text=ZH, language="chinese", speaker="eric")),
    ("design_en", "tiny-design", "design", dict(text=EN, language="english", instruct="A warm, low voice.")),
    ("xvec_en", "tiny-base", "clone", dict(text=EN, language="english", x_vector_only_mode=True)),
    ("icl_en_long", "tiny-base", "clone", dict(text=EN_LONG, language="english", ref_text=REF_TEXT)),
    ("icl_zh", "tiny-base", "clone", dict(text=ZH, language="chinese", ref_text=REF_TEXT)),
    # 1.7B CustomVoice with an instruction (tiny weights; config.json says tts_model_size 1b7)
    (
        "custom_instruct_en",
        "tiny-custom-1b7",
        "custom",
        dict(text=EN, language="english", speaker="ryan", instruct="Speak slowly, in a whisper."),
    ),
]


def reference_audio(seconds: float = 1.6, sr: int = 24000) -> np.ndarray:
    """A deterministic voice-like signal: harmonics of a gliding pitch plus noise."""
    rng = np.random.default_rng(1234)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 140 + 30 * np.sin(2 * np.pi * 1.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    wav = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
    wav = 0.25 * wav / np.abs(wav).max() + 0.01 * rng.standard_normal(t.shape)
    return wav.astype(np.float32)


def weights_hash(ckpt_dir: Path) -> str:
    h = hashlib.sha256()
    for f in ("model.safetensors", "speech_tokenizer/model.safetensors"):
        h.update((ckpt_dir / f).read_bytes())
    return h.hexdigest()


def run_case(tts: Qwen3TTSModel, method: str, kw: dict, ref: np.ndarray, non_streaming_mode: bool):  # type: ignore[no-untyped-def]
    """One official call; returns (generated codes [T, 16], waveform, extra arrays)."""
    captured: list[torch.Tensor] = []
    decode = tts.model.speech_tokenizer.decode

    def capture(items):  # type: ignore[no-untyped-def]
        captured.extend(it["audio_codes"] for it in items)
        return decode(items)

    tts.model.speech_tokenizer.decode = capture
    extra: dict[str, np.ndarray] = {}
    try:
        if method == "custom":
            wavs, _ = tts.generate_custom_voice(**kw, non_streaming_mode=non_streaming_mode, **GREEDY)
        elif method == "design":
            wavs, _ = tts.generate_voice_design(**kw, non_streaming_mode=non_streaming_mode, **GREEDY)
        else:
            items = tts.create_voice_clone_prompt(
                ref_audio=(ref, 24000),
                ref_text=kw.get("ref_text"),
                x_vector_only_mode=kw.get("x_vector_only_mode", False),
            )
            extra["speaker_embedding"] = items[0].ref_spk_embedding.float().cpu().numpy()
            if items[0].ref_code is not None:
                extra["ref_codes"] = items[0].ref_code.cpu().numpy().astype(np.int64)
            wavs, _ = tts.generate_voice_clone(
                text=kw["text"],
                language=kw["language"],
                voice_clone_prompt=items,
                non_streaming_mode=non_streaming_mode,
                **GREEDY,
            )
    finally:
        tts.model.speech_tokenizer.decode = decode
    codes = captured[0].cpu().numpy().astype(np.int64)
    if "ref_codes" in extra:  # the official decodes reference + generated frames together
        codes = codes[extra["ref_codes"].shape[0] :]
    return codes, np.asarray(wavs[0], dtype=np.float32), extra


def main(root: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.npz"):  # cases that no longer exist must not linger
        old.unlink()
    torch.manual_seed(0)
    ref = reference_audio()
    np.save(out / "ref_audio.npy", ref)
    models: dict[str, Qwen3TTSModel] = {}
    manifest: dict = {
        "qwen_tts": "0.1.1",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "greedy": dict(GREEDY),
        "checkpoints": {},
        "cases": {},
    }
    for name, ckpt, method, kw in CASES:
        if ckpt not in models:
            models[ckpt] = Qwen3TTSModel.from_pretrained(str(root / ckpt), dtype=torch.float32)
            manifest["checkpoints"][ckpt] = weights_hash(root / ckpt)
        tts = models[ckpt]
        for suffix, non_streaming_mode in LAYOUTS.items():
            codes, wav, extra = run_case(tts, method, kw, ref, non_streaming_mode)
            case = f"{name}_{suffix}"
            np.savez_compressed(out / f"{case}.npz", codes=codes, wav=wav, **extra)
            manifest["cases"][case] = {
                "checkpoint": ckpt,
                "method": method,
                "kwargs": kw,
                "non_streaming_mode": non_streaming_mode,
                "frames": int(codes.shape[0]),
            }
            print(f"{case}: {codes.shape[0]} frames, {len(wav) / 24000:.2f} s")
        if "instruct" in kw and method == "custom":  # the instruction must reach the official talker
            plain = {k: v for k, v in kw.items() if k != "instruct"}
            codes, _, _ = run_case(tts, method, plain, ref, True)
            with_instruct = np.load(out / f"{name}_whole.npz")["codes"]
            assert codes.shape != with_instruct.shape or (codes != with_instruct).any(), (
                f"{name}: the official package ignored the instruction (tts_model_size?)"
            )
    (out / "manifest.json").write_text(
        json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
