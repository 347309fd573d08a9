"""Frame generation for any number of utterances at once.

``FrameGenerator.tick(states)`` moves every utterance that can move by one frame:
utterances whose next text-track entry is unknown are simply skipped, new ones are
prefilled, the others share one batched talker step and one batched code-predictor
pass. The same code runs an offline synthesis (one utterance, whole text known) and
the streaming engine (many utterances, text arriving), which is what makes a streamed
utterance equal to the whole-text one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from qwen3tts_rt.engine.scheduler import DualTrackScheduler
from qwen3tts_rt.model.layers import KVCache
from qwen3tts_rt.model.prompt import VoicePrompt, overlay_embeds, prefix_embeds
from qwen3tts_rt.model.sampling import SamplingParams, draw, process_talker_logits
from qwen3tts_rt.model.talker import Qwen3TTSModel


class Phase(enum.Enum):
    PREFIX = "prefix"  # nothing run yet
    OVERLAY = "overlay"  # prefix in the cache; waiting for the first C text-track entries
    FRAME = "frame"  # codebook 0 sampled; the code predictor completes the frame next
    ADVANCE = "advance"  # frame emitted; waiting for the next text-track entry
    DONE = "done"


class FinishReason(enum.Enum):
    EOS = "eos"
    CAP = "cap"
    CANCELLED = "cancelled"


@dataclass
class UtteranceState:
    """Everything one utterance needs between ticks (its KV lives in a cache slot)."""

    voice: VoicePrompt
    language_id: int | None
    role_ids: list[int]
    params: SamplingParams
    sched: DualTrackScheduler
    slot: int
    max_frames: int
    generator: torch.Generator | None = None
    phase: Phase = Phase.PREFIX
    cache_len: int = 0
    hidden: torch.Tensor | None = None  # [H] talker output that produced ``c0``
    c0: int | None = None
    generated: torch.Tensor | None = None  # [V] bool, codebook-0 tokens so far
    num_sampled: int = 0
    frames_done: int = 0
    finish: FinishReason | None = None
    positions_consumed: int = 0  # text-track entries fed to the talker so far
    last_frame: torch.Tensor | None = None  # [G] the frame the next talker step consumes

    def finish_with(self, reason: FinishReason) -> None:
        self.phase = Phase.DONE
        self.finish = reason


@dataclass(frozen=True)
class FrameCap:
    """Frames an utterance may produce: ``base_frames + frames_per_token * text tokens``,
    and never more than ``max_new_tokens - 1`` (the official meaning). Stops an utterance
    whose EOS never comes from running away; it fires as finish reason ``cap``."""

    base_frames: int = 25
    frames_per_token: int = 8

    def frames(self, params: SamplingParams, text_tokens: int) -> int:
        return min(max(params.max_new_tokens - 1, 0), self.base_frames + self.frames_per_token * text_tokens)


def make_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(seed)
    return g


class FrameGenerator:
    """Owns the talker KV pool (one slot per live utterance) and the code-predictor
    scratch cache. Not thread-safe: one device thread drives it."""

    def __init__(self, model: Qwen3TTSModel, slots: int) -> None:
        self.model = model
        self.cache: KVCache = model.new_talker_cache(slots)
        self._predictor_cache: KVCache = model.new_predictor_cache(slots)
        tc = model.cfg.talker
        v = tc.stack.vocab_size
        self._suppress = torch.zeros(v, dtype=torch.bool)
        self._suppress[tc.suppressed_codec_ids] = True
        self._eos = tc.codec_eos_id

    @property
    def slots(self) -> int:
        return self.cache.slots

    # ----------------------------------------------------------------- sampling

    def _sample_c0(self, st: UtteranceState, logits: torch.Tensor) -> None:
        if st.generated is None:
            st.generated = torch.zeros(logits.shape[-1], dtype=torch.bool)
        p = st.params
        scores = process_talker_logits(
            logits.cpu(), st.generated, st.num_sampled, p, self._eos, self._suppress
        )
        tok = draw(scores, p.do_sample, p.temperature, p.top_k, p.top_p, st.generator)
        st.generated[tok] = True
        st.num_sampled += 1
        st.c0 = tok
        st.phase = Phase.FRAME

    # ----------------------------------------------------------------- phases

    @torch.inference_mode()
    def _prefill(self, st: UtteranceState) -> None:
        dev = self.model.device
        slot = torch.tensor([st.slot], device=dev)
        if st.phase is Phase.PREFIX:
            x = prefix_embeds(self.model, st.voice, st.language_id, st.role_ids)[None]
            self.model.talker_forward(x, self.cache, slot, torch.tensor([0], device=dev))
            st.cache_len = x.shape[1]
            st.phase = Phase.OVERLAY
        ids = st.sched.overlay_ids()
        if ids is None:
            return
        x = overlay_embeds(self.model, st.voice, ids)[None]
        h = self.model.talker_forward(x, self.cache, slot, torch.tensor([st.cache_len], device=dev))
        st.cache_len += x.shape[1]
        st.positions_consumed = len(ids)
        st.hidden = h[0, -1]
        self._sample_c0(st, self.model.codec_logits(h[:, -1])[0])

    @torch.inference_mode()
    def _advance(self, batch: list[UtteranceState]) -> None:
        """One talker position for each utterance: last frame + next text entry."""
        dev = self.model.device
        frames = torch.stack([st.last_frame for st in batch]).to(dev)  # type: ignore[misc]
        text_ids = []
        for st in batch:
            tid = st.sched.step_id(st.frames_done - 1)
            assert tid is not None
            text_ids.append(tid)
        x = self.model.frame_embed(frames) + self.model.text_embed(torch.tensor(text_ids, device=dev))
        slots = torch.tensor([st.slot for st in batch], device=dev)
        lengths = torch.tensor([st.cache_len for st in batch], device=dev)
        h = self.model.talker_forward(x[:, None], self.cache, slots, lengths)[:, 0]  # [B, H]
        logits = self.model.codec_logits(h)
        for i, st in enumerate(batch):
            st.cache_len += 1
            st.positions_consumed += 1
            st.hidden = h[i]
            self._sample_c0(st, logits[i])

    @torch.inference_mode()
    def _complete_frames(self, batch: list[UtteranceState]) -> list[torch.Tensor]:
        dev = self.model.device

        def choose(logits: torch.Tensor, group: int) -> torch.Tensor:
            out = []
            for i, st in enumerate(batch):
                p = st.params
                row = logits[i].cpu()
                out.append(
                    draw(
                        row,
                        p.subtalker_do_sample,
                        p.subtalker_temperature,
                        p.subtalker_top_k,
                        p.subtalker_top_p,
                        st.generator,
                    )
                )
            return torch.tensor(out, device=dev)

        c0 = torch.tensor([st.c0 for st in batch], device=dev)
        hidden = torch.stack([st.hidden for st in batch])  # type: ignore[misc]
        if self._predictor_cache.slots < len(batch):
            self._predictor_cache = self.model.new_predictor_cache(len(batch))
        rest = self.model.talker.code_predictor.predict(
            hidden, self.model.codec_embed(c0), choose, self._predictor_cache
        )
        frames = torch.cat([c0[:, None], rest], dim=1).cpu()  # [B, G]
        for i, st in enumerate(batch):
            st.last_frame = frames[i]
            st.frames_done += 1
            st.c0 = None
            st.phase = Phase.ADVANCE
        return list(frames)

    # ----------------------------------------------------------------- the tick

    def tick(self, states: list[UtteranceState]) -> list[tuple[UtteranceState, torch.Tensor]]:
        """Advance every utterance that can advance by at most one frame; returns the
        frames produced, in ``states`` order. Utterances that end are marked DONE."""
        for st in states:
            if st.phase in (Phase.PREFIX, Phase.OVERLAY):
                self._ensure_capacity(st)
                self._prefill(st)
        ready = []
        for st in states:
            if st.phase is not Phase.ADVANCE:
                continue
            if st.frames_done >= st.max_frames:
                st.finish_with(FinishReason.CAP)
            elif st.sched.step_id(st.frames_done - 1) is not None:
                ready.append(st)
        if ready:
            for st in ready:
                self._ensure_capacity(st)
            self._advance(ready)
        to_complete = []
        for st in states:
            if st.phase is not Phase.FRAME:
                continue
            if st.c0 == self._eos:
                st.finish_with(FinishReason.EOS)
            elif st.frames_done >= st.max_frames:
                st.finish_with(FinishReason.CAP)
            else:
                to_complete.append(st)
        if not to_complete:
            return []
        frames = self._complete_frames(to_complete)
        return list(zip(to_complete, frames))

    def _ensure_capacity(self, st: UtteranceState) -> None:
        need = st.cache_len + st.voice.overlay_len + 64
        if st.phase is Phase.PREFIX:
            need += 64 + len(st.voice.instruct_ids)
        self.cache.ensure_capacity(need)
