"""``qwen3tts-rt`` command line. Configuration is parsed here and nowhere else."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from qwen3tts_rt.errors import Qwen3TTSError

DEFAULT_MODEL = "Qwen/Qwen3-TTS-12Hz-0.6B-Base"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="checkpoint directory or hub id (default: %(default)s)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _add_voice_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("voice (one of)")
    g.add_argument("--speaker", help="built-in speaker (CustomVoice checkpoints)")
    g.add_argument("--ref-audio", help="reference audio to clone (Base checkpoints)")
    g.add_argument("--ref-text", help="transcript of --ref-audio (ICL cloning)")
    g.add_argument("--x-vector-only", action="store_true", help="clone from the speaker embedding only")
    g.add_argument("--voice-prompt", help="a saved clone prompt (see `qwen3tts-rt clone`)")
    g.add_argument("--instruct", help="voice/style description (VoiceDesign; 1.7B CustomVoice)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the checkpoint's generation_config.json)")
    g.add_argument("--greedy", action="store_true", help="official do_sample=False, subtalker_dosample=False")
    g.add_argument("--seed", type=int, help="seed for reproducible sampling")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--max-new-tokens", type=int, help="codebook-0 tokens to sample at most (frames + 1)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qwen3tts-rt", description="Real-time streaming Qwen3-TTS")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    mk = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the official layout")
    mk.add_argument("--preset", default="tiny", choices=["tiny", "0.6b", "1.7b"])
    mk.add_argument("--kind", default="base", choices=["base", "custom_voice", "voice_design"])
    mk.add_argument("--out", required=True)
    mk.add_argument("--seed", type=int, default=0)

    sy = sub.add_parser("synth", help="synthesise a whole text to a WAV file")
    _add_model_args(sy)
    sy.add_argument("--text", required=True)
    sy.add_argument("--language", default="auto")
    _add_voice_args(sy)
    _add_sampling_args(sy)
    sy.add_argument("--out", required=True, help="output WAV (24 kHz mono 16-bit)")
    sy.add_argument("--codes-out", help="codec frames as int64 .npy [frames, 16]")

    cl = sub.add_parser("clone", help="compute a reusable voice clone prompt from reference audio")
    _add_model_args(cl)
    cl.add_argument("--ref-audio", required=True)
    cl.add_argument("--ref-text")
    cl.add_argument("--x-vector-only", action="store_true")
    cl.add_argument("--out", required=True, help="prompt file (.safetensors)")
    return ap


def _sampling_kwargs(a: argparse.Namespace) -> dict[str, object]:
    kw: dict[str, object] = {
        "temperature": a.temperature,
        "top_k": a.top_k,
        "top_p": a.top_p,
        "repetition_penalty": a.repetition_penalty,
        "max_new_tokens": a.max_new_tokens,
        "seed": a.seed,
    }
    if a.greedy:
        kw.update(do_sample=False, subtalker_dosample=False)
    return {k: v for k, v in kw.items() if v is not None}


def _voice(tts, a: argparse.Namespace):  # type: ignore[no-untyped-def]
    from qwen3tts_rt.engine.voices import VoiceClonePrompt, voice_prompt

    clone = None
    if a.voice_prompt:
        clone = VoiceClonePrompt.load(a.voice_prompt)
    elif a.ref_audio:
        clone = tts.create_voice_clone_prompt(a.ref_audio, a.ref_text, a.x_vector_only)
        for note in clone.notes:
            print(f"note: {note}", file=sys.stderr)
    return voice_prompt(tts.ckpt, speaker=a.speaker, clone=clone, instruct=a.instruct)


def cmd_make_checkpoint(a: argparse.Namespace) -> None:
    from qwen3tts_rt.model.checkpoint import make_checkpoint

    out = make_checkpoint(a.out, preset=a.preset, kind=a.kind, seed=a.seed)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(
        f"wrote {a.preset} {a.kind} checkpoint (random weights, seed {a.seed}) to {out} ({size / 1e6:.1f} MB)"
    )


def cmd_synth(a: argparse.Namespace) -> None:
    from qwen3tts_rt.api import Qwen3TTS
    from qwen3tts_rt.audio import write_wav

    tts = Qwen3TTS.from_pretrained(a.model, dtype=a.dtype, device=a.device)
    voice = _voice(tts, a)
    res = tts.synthesize(a.text, a.language, voice, **_sampling_kwargs(a))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_wav(a.out, res.wav, res.sample_rate)
    if a.codes_out:
        np.save(a.codes_out, res.frames.numpy().astype(np.int64))
    t = res.timings
    print(
        f"{a.out}: {res.frames.shape[0]} frames, {res.audio_seconds:.2f} s of audio at {res.sample_rate} Hz "
        f"(finished by {res.finish.value}); first frame {t['first_frame_s'] * 1000:.0f} ms, "
        f"total {t['total_s']:.2f} s, RTF {t['rtf']:.3f}"
    )


def cmd_clone(a: argparse.Namespace) -> None:
    from qwen3tts_rt.api import Qwen3TTS

    tts = Qwen3TTS.from_pretrained(a.model, dtype=a.dtype, device=a.device)
    prompt = tts.create_voice_clone_prompt(a.ref_audio, a.ref_text, a.x_vector_only)
    prompt.save(a.out)
    mode = "x-vector only" if prompt.x_vector_only else f"ICL, {prompt.ref_codes.shape[0]} reference frames"  # type: ignore[union-attr]
    for note in prompt.notes:
        print(f"note: {note}")
    print(f"wrote voice clone prompt ({mode}) to {a.out}")


COMMANDS = {"make-checkpoint": cmd_make_checkpoint, "synth": cmd_synth, "clone": cmd_clone}


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        COMMANDS[a.cmd](a)
    except Qwen3TTSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
