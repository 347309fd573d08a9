"""Voices: reusable clone prompts, and turning a voice request into a ``VoicePrompt``.

A ``VoiceClonePrompt`` is computed once from reference audio (x-vector, and for ICL
the reference codec frames and transcript ids) and reused by any number of
utterances without re-encoding. It saves to one ``.safetensors`` file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from qwen3tts_rt.audio import ReferenceAudio, ReferenceAudioRules, load_reference_audio
from qwen3tts_rt.errors import (
    CheckpointError,
    InvalidInputError,
    MissingReferenceTextError,
    UnsupportedOperationError,
)
from qwen3tts_rt.model.checkpoint import Checkpoint
from qwen3tts_rt.model.prompt import VoicePrompt
from qwen3tts_rt.model.speaker import extract_speaker_embedding

PROMPT_FORMAT = "qwen3tts-rt.voice-clone-prompt.v1"


def model_fingerprint(ckpt: Checkpoint) -> str:
    """Identifies the weights a prompt was computed with (a prompt is only valid for them)."""
    st = ckpt.path / "model.safetensors"
    h = hashlib.sha256()
    h.update(json.dumps(ckpt.config.raw, sort_keys=True).encode())
    h.update(str(st.stat().st_size).encode())
    with st.open("rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


@dataclass
class VoiceClonePrompt:
    speaker_embedding: torch.Tensor  # [H] float32
    ref_codes: torch.Tensor | None  # [R, G] long; None in x-vector-only mode
    ref_text: str | None
    x_vector_only: bool
    model_fingerprint: str = ""
    notes: tuple[str, ...] = ()

    @property
    def icl(self) -> bool:
        return not self.x_vector_only

    def content_hash(self) -> str:
        h = hashlib.sha256()
        h.update(self.speaker_embedding.float().contiguous().numpy().tobytes())
        if self.ref_codes is not None:
            h.update(self.ref_codes.long().contiguous().numpy().tobytes())
        h.update((self.ref_text or "").encode())
        h.update(b"x" if self.x_vector_only else b"i")
        return h.hexdigest()

    def nbytes(self) -> int:
        n = self.speaker_embedding.numel() * self.speaker_embedding.element_size()
        if self.ref_codes is not None:
            n += self.ref_codes.numel() * self.ref_codes.element_size()
        return n + len((self.ref_text or "").encode())

    def save(self, path: str | Path) -> None:
        tensors = {"speaker_embedding": self.speaker_embedding.float().contiguous()}
        if self.ref_codes is not None:
            tensors["ref_codes"] = self.ref_codes.long().contiguous()
        meta = {
            "format": PROMPT_FORMAT,
            "ref_text": self.ref_text or "",
            "x_vector_only": "1" if self.x_vector_only else "0",
            "model_fingerprint": self.model_fingerprint,
            "notes": json.dumps(list(self.notes)),
        }
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> VoiceClonePrompt:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != PROMPT_FORMAT:
            raise CheckpointError(f"{path} is not a qwen3tts-rt voice clone prompt")
        t = load_file(str(path))
        return cls(
            speaker_embedding=t["speaker_embedding"],
            ref_codes=t.get("ref_codes"),
            ref_text=meta.get("ref_text") or None,
            x_vector_only=meta.get("x_vector_only") == "1",
            model_fingerprint=meta.get("model_fingerprint", ""),
            notes=tuple(json.loads(meta.get("notes", "[]"))),
        )


def check_clone_request(
    ckpt: Checkpoint, ref_text: str | None, x_vector_only: bool, rules: ReferenceAudioRules
) -> None:
    """The rules a clone request must meet before any audio is decoded."""
    if ckpt.config.tts_model_type != "base" or ckpt.model.speaker_encoder is None:
        raise UnsupportedOperationError(
            f"voice cloning needs a Base checkpoint; this one is '{ckpt.config.tts_model_type}'",
            field="ref_audio",
        )
    if ref_text and len(ref_text) > rules.max_ref_text_chars:
        raise InvalidInputError(
            f"has {len(ref_text)} characters; at most {rules.max_ref_text_chars} (max_ref_text_chars): "
            "the transcript of the reference audio only",
            field="ref_text",
        )
    if not x_vector_only and not (ref_text and ref_text.strip()):
        raise MissingReferenceTextError(
            "ICL voice cloning needs the transcript of the reference audio; "
            "give ref_text, or use x-vector-only mode (speaker embedding only)"
        )


@torch.inference_mode()
def encode_clone_prompt(
    ckpt: Checkpoint,
    audio: ReferenceAudio,
    ref_text: str | None,
    *,
    x_vector_only: bool,
) -> VoiceClonePrompt:
    """The device half of cloning: decoded, validated 24 kHz reference audio -> prompt
    (speaker encoder, and for ICL the codec encoder). A server runs it on the engine's
    device thread (``Engine.submit``)."""
    assert ckpt.model.speaker_encoder is not None  # check_clone_request
    emb = extract_speaker_embedding(
        ckpt.model.speaker_encoder, audio.wav, ckpt.model.device, ckpt.model.dtype
    )
    codes = None
    if not x_vector_only:
        wav = torch.from_numpy(np.ascontiguousarray(audio.wav))[None].to(ckpt.codec.device)
        codes = ckpt.codec.encode(wav)[0].cpu()  # [R, G]
    return VoiceClonePrompt(
        speaker_embedding=emb.float().cpu(),
        ref_codes=codes,
        ref_text=None if x_vector_only else ref_text,
        x_vector_only=x_vector_only,
        model_fingerprint=model_fingerprint(ckpt),
        notes=tuple(audio.notes),
    )


def create_voice_clone_prompt(
    ckpt: Checkpoint,
    ref_audio: Any,
    ref_text: str | None = None,
    *,
    x_vector_only: bool = False,
    sample_rate: int | None = None,
    rules: ReferenceAudioRules | None = None,
    allow_paths: bool = True,
) -> VoiceClonePrompt:
    """Reference audio (path, bytes, base64 or numpy + ``sample_rate``) -> reusable prompt.
    Servers pass ``allow_paths=False`` so that a client string is never read as a file name."""
    rules = rules or ReferenceAudioRules()
    check_clone_request(ckpt, ref_text, x_vector_only, rules)
    audio = load_reference_audio(ref_audio, sample_rate=sample_rate, rules=rules, allow_paths=allow_paths)
    return encode_clone_prompt(ckpt, audio, ref_text, x_vector_only=x_vector_only)


def voice_prompt(
    ckpt: Checkpoint,
    *,
    speaker: str | None = None,
    clone: VoiceClonePrompt | None = None,
    instruct: str | None = None,
) -> VoicePrompt:
    """Map a voice request onto the talker input pieces (validated by ``check_voice``)."""
    instruct_ids = ckpt.tokenizer.instruct_ids(instruct) if instruct else []
    # 0.6B CustomVoice checkpoints ignore instructions (as the official package does).
    if speaker is not None and ckpt.config.tts_model_size == "0b6":
        instruct_ids = []
    if clone is not None:
        return VoicePrompt(
            speaker_embedding=clone.speaker_embedding,
            ref_text_ids=ckpt.tokenizer.ref_text_ids(clone.ref_text) if clone.icl and clone.ref_text else [],
            ref_codes=clone.ref_codes if clone.icl else None,
            instruct_ids=instruct_ids,
        )
    return VoicePrompt(speaker=speaker, instruct_ids=instruct_ids)
