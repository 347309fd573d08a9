"""Talker input layouts (embedding arithmetic only).

The talker input is, in order:

* ``prefix``  — [instruct] + ``<|im_start|>assistant\\n`` + the codec prefix
  (think/nothink, think_bos, [language], think_eos, [speaker], pad) each summed with
  tts_pad, the last one with tts_bos. Independent of the text and the same in both
  layouts: computed as soon as an utterance starts.
* ``body`` — whole-text layout only: ``ref_text_ids + text_ids + [tts_eos]``, each
  summed with codec_pad.
* ``overlay`` — C positions where the codec track ``[codec_bos] + reference frames``
  (C = 1 without ICL reference codes) is summed with text ids: in dual-track the first
  C entries of the text track, in the whole-text layout tts_pad.
* one position per generated frame: sum of the frame's codebook embeddings + a text id:
  in dual-track the next text-track entry, in the whole-text layout tts_pad.

The text track is ``ref_text_ids + text_ids + [tts_eos]`` followed by tts_pad forever
(see ``engine/scheduler.py``). These are the official ``non_streaming_mode=False``
(dual-track) and ``non_streaming_mode=True`` (whole-text) layouts, rewritten so that
each piece needs only the text it really depends on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qwen3tts_rt.errors import UnknownLanguageError, UnknownSpeakerError, UnsupportedOperationError, echo
from qwen3tts_rt.model.talker import Qwen3TTSModel


@dataclass
class VoicePrompt:
    """What a voice contributes to the talker input. One of:

    * built-in speaker (CustomVoice): ``speaker`` name;
    * x-vector clone (Base): ``speaker_embedding`` only;
    * ICL clone (Base): ``speaker_embedding`` + ``ref_text_ids`` + ``ref_codes``;
    * voice design (VoiceDesign): ``instruct_ids`` only.
    ``instruct_ids`` may also accompany a speaker on 1.7B CustomVoice checkpoints.
    """

    speaker: str | None = None
    speaker_embedding: torch.Tensor | None = None  # [H]
    ref_text_ids: list[int] = field(default_factory=list)
    ref_codes: torch.Tensor | None = None  # [R, G] long
    instruct_ids: list[int] = field(default_factory=list)

    @property
    def icl(self) -> bool:
        return self.ref_codes is not None

    @property
    def overlay_len(self) -> int:
        """C: the number of text-track entries the overlay consumes."""
        return 1 + (0 if self.ref_codes is None else int(self.ref_codes.shape[0]))


def resolve_language(model: Qwen3TTSModel, language: str, speaker: str | None) -> int | None:
    """Codec language id for ``language`` (None for 'auto'); a dialect speaker speaking
    Chinese or auto uses its dialect, as the official code does."""
    cfg = model.cfg.talker
    lang = (language or "auto").strip().lower()
    if lang != "auto" and (lang not in cfg.languages or "dialect" in lang):
        allowed = ", ".join(model.cfg.languages)
        raise UnknownLanguageError(
            f"unknown language {echo(language)}; this model speaks: {allowed}", field="language"
        )
    lang_id = None if lang == "auto" else cfg.languages[lang]
    if speaker and lang in ("chinese", "auto"):
        dialect = cfg.speaker_dialects.get(speaker.lower())
        if dialect:
            lang_id = cfg.languages[dialect.lower()]
    return lang_id


def check_voice(model: Qwen3TTSModel, voice: VoicePrompt) -> None:
    kind = model.cfg.tts_model_type
    if voice.speaker is not None:
        if kind != "custom_voice":
            raise UnsupportedOperationError(
                f"built-in speakers need a CustomVoice checkpoint; this one is '{kind}'", field="speaker"
            )
        if voice.speaker.lower() not in model.cfg.talker.speakers:
            allowed = ", ".join(model.cfg.speakers)
            raise UnknownSpeakerError(
                f"unknown speaker {echo(voice.speaker)}; choose one of: {allowed}", field="speaker"
            )
    elif voice.speaker_embedding is not None:
        if kind != "base":
            raise UnsupportedOperationError(
                f"voice cloning needs a Base checkpoint; this one is '{kind}'", field="voice"
            )
    elif kind == "custom_voice":
        allowed = ", ".join(model.cfg.speakers)
        raise UnknownSpeakerError(
            f"a CustomVoice checkpoint needs a speaker; choose one of: {allowed}", field="speaker"
        )
    elif kind == "base":
        raise UnsupportedOperationError(
            "a Base checkpoint speaks only with a cloned voice: give reference audio or a voice id",
            field="voice",
        )
    if voice.instruct_ids and kind == "base":
        raise UnsupportedOperationError("instruct is not supported by Base checkpoints", field="instruct")


@torch.inference_mode()
def prefix_embeds(
    model: Qwen3TTSModel, voice: VoicePrompt, language_id: int | None, role_ids: list[int]
) -> torch.Tensor:
    """The text-independent head of the talker input: [P, H]."""
    cfg, tcfg = model.cfg, model.cfg.talker
    dev = model.device
    if language_id is None:
        codec_ids = [tcfg.codec_nothink_id, tcfg.codec_think_bos_id, tcfg.codec_think_eos_id]
    else:
        codec_ids = [tcfg.codec_think_id, tcfg.codec_think_bos_id, language_id, tcfg.codec_think_eos_id]
    codec = [model.codec_embed(torch.tensor(codec_ids, device=dev))]
    if voice.speaker is not None:
        spk_id = tcfg.speakers[voice.speaker.lower()]
        codec.append(model.codec_embed(torch.tensor([spk_id], device=dev)))
    elif voice.speaker_embedding is not None:
        codec.append(voice.speaker_embedding.to(dev, model.dtype).view(1, -1))
    codec.append(model.codec_embed(torch.tensor([tcfg.codec_pad_id], device=dev)))
    codec_part = torch.cat(codec, dim=0)  # [n-1, H]: everything but codec_bos
    pad, bos = model.text_embed(torch.tensor([cfg.tts_pad_id, cfg.tts_bos_id], device=dev))
    text_part = torch.cat([pad.expand(codec_part.shape[0] - 1, -1), bos[None]], dim=0)
    parts = []
    if voice.instruct_ids:
        parts.append(model.text_embed(torch.tensor(voice.instruct_ids, device=dev)))
    parts.append(model.text_embed(torch.tensor(role_ids, device=dev)))
    parts.append(text_part + codec_part)
    return torch.cat(parts, dim=0)


@torch.inference_mode()
def overlay_embeds(model: Qwen3TTSModel, voice: VoicePrompt, track_ids: list[int]) -> torch.Tensor:
    """The C overlay positions: codec_bos + reference frames summed with the first C
    text-track ids ([C, H])."""
    dev = model.device
    assert len(track_ids) == voice.overlay_len
    codec = model.codec_embed(torch.tensor([model.cfg.talker.codec_bos_id], device=dev))
    if voice.ref_codes is not None:
        codec = torch.cat([codec, model.frame_embed(voice.ref_codes.to(dev))], dim=0)
    return model.text_embed(torch.tensor(track_ids, device=dev)) + codec


@torch.inference_mode()
def prompt_embeds(
    model: Qwen3TTSModel, voice: VoicePrompt, body_ids: list[int], overlay_ids: list[int]
) -> torch.Tensor:
    """Everything prefilled after the prefix ([len(body) + C, H]): the body positions
    (text id + codec_pad) followed by the overlay."""
    overlay = overlay_embeds(model, voice, overlay_ids)
    if not body_ids:
        return overlay
    dev = model.device
    ids = torch.tensor(body_ids, device=dev)
    pad = model.codec_embed(torch.tensor([model.cfg.talker.codec_pad_id], device=dev))
    return torch.cat([model.text_embed(ids) + pad, overlay], dim=0)


def default_non_streaming_mode(voice: VoicePrompt) -> bool:
    """The official default layout for this kind of voice: ``generate_custom_voice`` and
    ``generate_voice_design`` read the whole text (True), ``generate_voice_clone`` uses
    the dual-track layout (False)."""
    return voice.speaker_embedding is None
