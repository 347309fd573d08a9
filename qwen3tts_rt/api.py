"""Python API shaped like the official ``qwen_tts.Qwen3TTSModel``.

    tts = Qwen3TTS.from_pretrained("Qwen/Qwen3-TTS-12Hz-0.6B-Base")
    prompt = tts.create_voice_clone_prompt("me.wav", ref_text="Hello there.")
    wavs, sr = tts.generate_voice_clone("Nice to meet you.", "english", voice_clone_prompt=prompt)

Each ``generate_*`` returns ``(wavs, sample_rate)`` with one float32 array per text.
``non_streaming_mode`` picks the layout with the official name and defaults: True (the
whole text is read before the first frame) for ``generate_custom_voice`` and
``generate_voice_design``, False (dual-track) for ``generate_voice_clone``.
Sampling keywords use the official names (``do_sample``, ``top_k``, ``top_p``,
``temperature``, ``repetition_penalty``, ``subtalker_dosample``, ``subtalker_top_k``,
``subtalker_top_p``, ``subtalker_temperature``, ``max_new_tokens``) plus ``seed``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from qwen3tts_rt.engine.synth import SynthesisResult, synthesize
from qwen3tts_rt.engine.voices import VoiceClonePrompt, create_voice_clone_prompt, voice_prompt
from qwen3tts_rt.model.checkpoint import Checkpoint, load_checkpoint
from qwen3tts_rt.model.prompt import VoicePrompt, default_non_streaming_mode
from qwen3tts_rt.model.sampling import SamplingParams

_OFFICIAL_KEYS = {
    "do_sample": "do_sample",
    "top_k": "top_k",
    "top_p": "top_p",
    "temperature": "temperature",
    "repetition_penalty": "repetition_penalty",
    "subtalker_dosample": "subtalker_do_sample",
    "subtalker_top_k": "subtalker_top_k",
    "subtalker_top_p": "subtalker_top_p",
    "subtalker_temperature": "subtalker_temperature",
    "max_new_tokens": "max_new_tokens",
}


class Qwen3TTS:
    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt

    @classmethod
    def from_pretrained(
        cls, path_or_id: str, *, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
    ) -> Qwen3TTS:
        return cls(load_checkpoint(path_or_id, device=device, dtype=dtype))

    # ------------------------------------------------------------------ info

    @property
    def model_type(self) -> str:
        return self.ckpt.config.tts_model_type

    def get_supported_languages(self) -> list[str]:
        return self.ckpt.config.languages

    def get_supported_speakers(self) -> list[str]:
        return self.ckpt.config.speakers

    # ------------------------------------------------------------------ helpers

    def sampling(self, **kw: Any) -> tuple[SamplingParams, int | None]:
        seed = kw.pop("seed", None)
        unknown = set(kw) - set(_OFFICIAL_KEYS)
        if unknown:
            raise TypeError(f"unknown sampling arguments: {', '.join(sorted(unknown))}")
        ours = {_OFFICIAL_KEYS[k]: v for k, v in kw.items()}
        return SamplingParams.from_generation_config(self.ckpt.generation_config, **ours), seed

    def synthesize(
        self,
        text: str,
        language: str,
        voice: VoicePrompt,
        non_streaming_mode: bool | None = None,
        **sampling: Any,
    ) -> SynthesisResult:
        """One utterance. ``non_streaming_mode`` None: the official default for this kind
        of voice (whole text for built-in speakers and voice design, dual-track for clones)."""
        params, seed = self.sampling(**sampling)
        if non_streaming_mode is None:
            non_streaming_mode = default_non_streaming_mode(voice)
        return synthesize(
            self.ckpt, voice, text, language, params, seed=seed, non_streaming_mode=non_streaming_mode
        )

    def _run(  # type: ignore[no-untyped-def]
        self,
        texts: str | list[str],
        language: str | list[str],
        voices: list[VoicePrompt],
        non_streaming_mode: bool,
        **kw: Any,
    ):
        text_list = [texts] if isinstance(texts, str) else list(texts)
        langs = [language] * len(text_list) if isinstance(language, str) else list(language)
        if len(voices) == 1:
            voices = voices * len(text_list)
        if not (len(text_list) == len(langs) == len(voices)):
            raise ValueError(f"batch size mismatch: text={len(text_list)}, language={len(langs)}")
        wavs: list[np.ndarray] = []
        sr = self.ckpt.codec.sample_rate
        for t, lang, v in zip(text_list, langs, voices):
            wavs.append(self.synthesize(t, lang, v, non_streaming_mode, **kw).wav)
        return wavs, sr

    # ------------------------------------------------------------------ official-style API

    def generate_custom_voice(
        self,
        text: str | list[str],
        language: str | list[str],
        speaker: str,
        instruct: str | None = None,
        non_streaming_mode: bool = True,
        **kw: Any,
    ) -> tuple[list[np.ndarray], int]:
        voice = voice_prompt(self.ckpt, speaker=speaker, instruct=instruct)
        return self._run(text, language, [voice], non_streaming_mode, **kw)

    def generate_voice_design(
        self,
        text: str | list[str],
        language: str | list[str],
        instruct: str,
        non_streaming_mode: bool = True,
        **kw: Any,
    ) -> tuple[list[np.ndarray], int]:
        return self._run(
            text, language, [voice_prompt(self.ckpt, instruct=instruct)], non_streaming_mode, **kw
        )

    def create_voice_clone_prompt(
        self,
        ref_audio: Any,
        ref_text: str | None = None,
        x_vector_only_mode: bool = False,
        *,
        sample_rate: int | None = None,
    ) -> VoiceClonePrompt:
        return create_voice_clone_prompt(
            self.ckpt, ref_audio, ref_text, x_vector_only=x_vector_only_mode, sample_rate=sample_rate
        )

    def generate_voice_clone(
        self,
        text: str | list[str],
        language: str | list[str],
        voice_clone_prompt: VoiceClonePrompt | None = None,
        ref_audio: Any = None,
        ref_text: str | None = None,
        x_vector_only_mode: bool = False,
        non_streaming_mode: bool = False,
        **kw: Any,
    ) -> tuple[list[np.ndarray], int]:
        if voice_clone_prompt is None:
            if ref_audio is None:
                raise ValueError(
                    "give voice_clone_prompt, or ref_audio (+ ref_text unless x_vector_only_mode)"
                )
            voice_clone_prompt = self.create_voice_clone_prompt(ref_audio, ref_text, x_vector_only_mode)
        voice = voice_prompt(self.ckpt, clone=voice_clone_prompt)
        return self._run(text, language, [voice], non_streaming_mode, **kw)
