"""One utterance, whole text known: the offline path behind ``synth`` and the Python API.

It runs the same ``FrameGenerator`` and the same streaming decoder (one frame per
step) as the streaming engine, so a streamed utterance gives the same frames and the
same samples, in either layout (``non_streaming_mode``, the official name: False is
the dual-track layout, True the whole-text layout).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from qwen3tts_rt.engine.generation import (
    FinishReason,
    FrameCap,
    FrameGenerator,
    UtteranceState,
)
from qwen3tts_rt.engine.scheduler import new_scheduler
from qwen3tts_rt.errors import InvalidInputError
from qwen3tts_rt.model.checkpoint import Checkpoint
from qwen3tts_rt.model.prompt import VoicePrompt, check_voice, resolve_language
from qwen3tts_rt.model.sampling import SamplingParams


@dataclass
class SynthesisResult:
    frames: torch.Tensor  # [T, G] long
    wav: np.ndarray  # [T * samples_per_frame] float32
    sample_rate: int
    finish: FinishReason
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def audio_seconds(self) -> float:
        return len(self.wav) / self.sample_rate


def new_utterance(
    ckpt: Checkpoint,
    voice: VoicePrompt,
    language: str,
    params: SamplingParams,
    *,
    seed: int | None,
    slot: int,
    non_streaming_mode: bool = False,
) -> UtteranceState:
    """Validated utterance state with an empty text track (text is pushed later; the
    frame cap is set from the text length when the text ends). ``non_streaming_mode``
    picks the layout: False, dual-track (the talker reads the text as it arrives); True,
    whole-text (the prefix is prefilled at once, the text when it has ended)."""
    check_voice(ckpt.model, voice)
    lang_id = resolve_language(ckpt.model, language, voice.speaker)
    cfg = ckpt.config
    sched = new_scheduler(
        non_streaming_mode=non_streaming_mode,
        tts_eos_id=cfg.tts_eos_id,
        tts_pad_id=cfg.tts_pad_id,
        overlay_len=voice.overlay_len,
        ref_ids=list(voice.ref_text_ids),
    )
    return UtteranceState(
        voice=voice,
        language_id=lang_id,
        role_ids=ckpt.tokenizer.role_prefix_ids(),
        params=params,
        sched=sched,
        slot=slot,
        # As the official generate: max_new_tokens counts sampled codebook-0 tokens,
        # the last of which is never expanded into a frame.
        max_frames=max(params.max_new_tokens - 1, 0),
        seed=seed,
    )


@torch.inference_mode()
def synthesize(
    ckpt: Checkpoint,
    voice: VoicePrompt,
    text: str,
    language: str = "auto",
    params: SamplingParams | None = None,
    *,
    seed: int | None = None,
    cap: FrameCap | None = None,
    non_streaming_mode: bool = False,
) -> SynthesisResult:
    params = (params or SamplingParams.from_generation_config(ckpt.generation_config)).validated()
    text_ids = ckpt.tokenizer.text_ids(text)
    if not text_ids:
        raise InvalidInputError("text is empty: there is nothing to say", field="text")
    t0 = time.perf_counter()
    st = new_utterance(
        ckpt, voice, language, params, seed=seed, slot=0, non_streaming_mode=non_streaming_mode
    )
    st.sched.push(text_ids)
    st.sched.end()
    st.max_frames = (cap or FrameCap()).frames(params, len(text_ids))
    gen = FrameGenerator(ckpt.model, slots=1)
    decoder = ckpt.codec.decoder
    dec_state = decoder.new_state(1, ckpt.codec.device, ckpt.codec.dtype)
    if voice.ref_codes is not None:  # the decoder continues from the reference audio
        decoder.decode_step(voice.ref_codes[None].to(ckpt.codec.device), dec_state)
    frames: list[torch.Tensor] = []
    chunks: list[np.ndarray] = []
    first = None
    while st.finish is None:
        for _, frame in gen.tick([st]):
            frames.append(frame)
            pcm = decoder.decode_step(frame.view(1, 1, -1).to(ckpt.codec.device), dec_state)
            chunks.append(pcm[0].float().cpu().numpy())
            if first is None:
                first = time.perf_counter() - t0
    if st.error is not None:  # a step raised: the offline call raises it
        raise st.error
    total = time.perf_counter() - t0
    g = ckpt.config.talker.num_code_groups
    frames_t = torch.stack(frames) if frames else torch.zeros((0, g), dtype=torch.long)
    wav = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    sr = ckpt.codec.sample_rate
    timings = {"first_frame_s": first or total, "total_s": total, "rtf": total / max(len(wav) / sr, 1e-9)}
    assert st.finish is not None
    return SynthesisResult(frames_t, wav.astype(np.float32), sr, st.finish, timings)
