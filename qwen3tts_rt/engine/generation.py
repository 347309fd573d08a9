"""Frame generation for any number of utterances at once.

``FrameGenerator.tick(states)`` moves every utterance that can move by one frame:
utterances whose next text input is unknown are simply skipped, new ones are
prefilled, the others share one batched talker step and one batched code-predictor
pass. The same code runs an offline synthesis (one utterance, whole text known) and
the streaming engine (many utterances, text arriving), which is what makes a streamed
utterance equal to the whole-text one. Each utterance has its own layout (its
scheduler, see ``engine/scheduler.py``): the prefix is prefilled at once in both; a
dual-track utterance then moves as its text arrives, a whole-text one waits for the
end of its text, prefills it, and then steps on tts_pad.

Two ways to run the per-frame steps, same results (see ``FastPath``):

* dynamic (CPU default): batches of exactly the ready rows, a KV cache that grows;
* static (CUDA default): a preallocated KV cache, batches padded to a bucket with idle
  rows on a scratch slot, attention over the whole cache with a per-row length mask (or
  flash-attn), optionally replayed as CUDA graphs captured in ``warmup``.

Per-utterance tensors that a step needs (last frame, talker hidden state, codebook 0,
tokens generated so far) live on the device in tables indexed by slot, and sampling is
done there too, so a step needs no host round trip until its tokens are read back.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from qwen3tts_rt.engine.scheduler import TextScheduler
from qwen3tts_rt.model.cuda_graphs import FastPath, StepCache
from qwen3tts_rt.model.layers import KVCache, attention_backend
from qwen3tts_rt.model.prompt import VoicePrompt, prefix_embeds, prompt_embeds
from qwen3tts_rt.model.sampling import (
    DrawSettings,
    SamplingParams,
    draw_rows,
    draw_values,
    gumbel_noise,
    process_talker_logits,
    random_seed,
    split_seed,
)
from qwen3tts_rt.model.talker import Qwen3TTSModel

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    PREFIX = "prefix"  # nothing run yet
    OVERLAY = "overlay"  # prefix in the cache; waiting for the text the layout prefills (``prompt_ids``)
    FRAME = "frame"  # codebook 0 sampled; the code predictor completes the frame next
    ADVANCE = "advance"  # frame emitted; waiting for the next text-track entry
    DONE = "done"


class FinishReason(enum.Enum):
    EOS = "eos"
    CAP = "cap"
    CANCELLED = "cancelled"
    ERROR = "error"  # a step of this utterance raised (``UtteranceState.error``)


@dataclass
class UtteranceState:
    """Everything one utterance needs between ticks (its KV and its device-side tables
    live in slot ``slot`` of the generator)."""

    voice: VoicePrompt
    language_id: int | None
    role_ids: list[int]
    params: SamplingParams
    sched: TextScheduler  # dual-track or whole-text layout
    slot: int
    max_frames: int
    seed: int | None = None  # the draws' seed; None: a random one, drawn at creation
    phase: Phase = Phase.PREFIX
    cache_len: int = 0
    c0: int | None = None
    num_sampled: int = 0
    frames_done: int = 0
    finish: FinishReason | None = None
    positions_consumed: int = 0  # text-track entries fed to the talker so far
    last_frame: torch.Tensor | None = None  # [G] the last frame produced (host copy)
    error: Exception | None = None  # what ended it, when ``finish`` is ERROR

    def __post_init__(self) -> None:
        if self.seed is None:
            self.seed = random_seed()

    def finish_with(self, reason: FinishReason) -> None:
        self.phase = Phase.DONE
        self.finish = reason

    def fail(self, exc: Exception) -> None:
        """End the utterance because one of its steps raised ``exc``."""
        log.error("utterance in slot %d failed: %s: %s", self.slot, type(exc).__name__, exc, exc_info=exc)
        self.error = exc
        self.finish_with(FinishReason.ERROR)


T = TypeVar("T")
R = TypeVar("R")


def run_isolated(
    items: list[T], step: Callable[[list[T]], list[R]], fail: Callable[[T, Exception], None]
) -> list[tuple[T, R]]:
    """``step(items)`` (one result per item, in order) as one batch; if the batch raises,
    run each item alone, so that a fault of one item fails only that item (``fail``) and
    the others get the results they would have had. A step must leave no trace when it
    raises, or be idempotent when re-run (the talker and code-predictor steps write the
    same KV positions and table rows again; the decoder writes its state back only at
    the end), and be batch-invariant (tested: batched == alone)."""
    if not items:
        return []
    try:
        return list(zip(items, step(items), strict=True))
    except Exception as e:
        if len(items) == 1:
            fail(items[0], e)
            return []
        log.warning(
            "a batched step of %d rows raised %s: %s; running each row alone", len(items), type(e).__name__, e
        )
    done: list[tuple[T, R]] = []
    for item in items:
        try:
            done.extend(zip([item], step([item]), strict=True))
        except Exception as e:
            fail(item, e)
    return done


@dataclass(frozen=True)
class FrameCap:
    """Frames an utterance may produce: ``base_frames + frames_per_token * text tokens``,
    and never more than ``max_new_tokens - 1`` (the official meaning). Stops an utterance
    whose EOS never comes from running away; it fires as finish reason ``cap``."""

    base_frames: int = 25
    frames_per_token: int = 8

    def frames(self, params: SamplingParams, text_tokens: int) -> int:
        return min(max(params.max_new_tokens - 1, 0), self.base_frames + self.frames_per_token * text_tokens)


# Per-row inputs of a step, packed on the host into one int64 [B, 13] and one float32
# [B, 5] tensor (two small copies per step; static buffers when captured).
_INT_COLS = 13
_FLOAT_COLS = 5


class _Rows:
    """Views of the packed per-row inputs."""

    def __init__(self, ints: torch.Tensor, floats: torch.Tensor) -> None:
        self.slot = ints[:, 0]  # [B] KV / table slot
        self.length = ints[:, 1]  # [B] talker positions already cached
        self.text = ints[:, 2]  # [B] text-track id of the talker step
        self.step = ints[:, 3]  # [B] draw counter: frame index within the utterance
        self.seed = ints[:, 4:6]  # [B, 2] seed halves
        self.eos_allowed = ints[:, 6].bool()
        self.penalty = floats[:, 2]
        self.talker = DrawSettings(
            ints[:, 7].bool(), floats[:, 0], ints[:, 8], floats[:, 1], ints[:, 9].bool()
        )
        self.predictor = DrawSettings(
            ints[:, 10].bool(), floats[:, 3], ints[:, 11], floats[:, 4], ints[:, 12].bool()
        )


class FrameGenerator:
    """Owns the talker KV pool (one slot per live utterance, plus a scratch slot for the
    idle rows that pad a static batch), the code-predictor scratch cache and the per-slot
    device tables. Not thread-safe: one device thread drives it."""

    def __init__(self, model: Qwen3TTSModel, slots: int, fast: FastPath | None = None) -> None:
        self.model = model
        # Default: static on CUDA (a one-off synthesis does not capture graphs), dynamic on CPU.
        self.fast = fast or FastPath.resolve(model.device, cuda_graphs=False)
        self.scratch = slots
        tc = model.cfg.talker
        dev, dt = model.device, model.dtype
        groups = tc.num_code_groups
        if self.fast.static:
            backend = attention_backend(dev, dt, self.fast.attention)
            self.cache = KVCache.allocate(
                tc.stack, slots + 1, self.fast.max_positions, dev, dt, static=True, backend=backend
            )
            rows = max(self.fast.bucket_list(slots))
            self._predictor_cache = KVCache.allocate(
                tc.code_predictor, rows, groups + 1, dev, dt, static=True, backend=backend
            )
        else:
            self.cache = model.new_talker_cache(slots + 1)
            self._predictor_cache = model.new_predictor_cache(slots)
        v = tc.stack.vocab_size
        self._eos = tc.codec_eos_id
        self._suppress = torch.zeros(v, dtype=torch.bool, device=dev)
        self._suppress[tc.suppressed_codec_ids] = True
        self._eos_mask = torch.zeros(v, dtype=torch.bool, device=dev)
        self._eos_mask[self._eos] = True
        self._true = torch.ones((), dtype=torch.bool, device=dev)
        self._pad_text = model.cfg.tts_pad_id
        # Per-slot device tables (row ``scratch`` absorbs the padding rows' writes).
        self._generated = torch.zeros(slots + 1, v, dtype=torch.bool, device=dev)  # codebook-0 tokens so far
        self._hidden = torch.zeros(slots + 1, tc.stack.hidden_size, dtype=dt, device=dev)  # produced c0
        self._c0 = torch.zeros(slots + 1, dtype=torch.long, device=dev)
        self._frames = torch.zeros(slots + 1, groups, dtype=torch.long, device=dev)  # last frame
        self._steps = StepCache(self.fast)

    @property
    def slots(self) -> int:
        return self.scratch

    # ----------------------------------------------------------------- per-row inputs

    def _pack(
        self, batch: list[UtteranceState], size: int, *, talker: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-row inputs of ``batch`` padded to ``size`` rows with idle (greedy,
        scratch-slot) rows, on the device."""
        ints: list[list[int]] = []
        floats: list[list[float]] = []
        for st in batch:
            p = st.params
            assert st.seed is not None
            lo, hi = split_seed(st.seed)
            text = self._pad_text
            if talker and st.phase is Phase.ADVANCE:
                tid = st.sched.step_id(st.frames_done - 1)
                assert tid is not None
                text = tid
            sample, temp, top_k, use_top_p, top_p_rest = draw_values(p, subtalker=False)
            s_sample, s_temp, s_top_k, s_use_top_p, s_top_p_rest = draw_values(p, subtalker=True)
            step = st.num_sampled if talker else st.frames_done
            ints.append(
                [
                    st.slot,
                    st.cache_len,
                    text,
                    step,
                    lo,
                    hi,
                    int(st.num_sampled >= p.min_new_tokens),
                    int(sample),
                    top_k,
                    int(use_top_p),
                    int(s_sample),
                    s_top_k,
                    int(s_use_top_p),
                ]
            )
            floats.append([temp, top_p_rest, p.repetition_penalty, s_temp, s_top_p_rest])
        for _ in range(size - len(batch)):
            ints.append([self.scratch, 0, self._pad_text, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0])
            floats.append([1.0, 0.0, 1.0, 1.0, 0.0])
        dev = self.model.device
        i = torch.tensor(ints, dtype=torch.long).view(size, _INT_COLS)
        f = torch.tensor(floats, dtype=torch.float32).view(size, _FLOAT_COLS)
        return i.to(dev), f.to(dev)

    @staticmethod
    def _samples(batch: list[UtteranceState], talker: bool) -> bool:
        return any(draw_values(st.params, subtalker=not talker)[0] for st in batch)

    # ----------------------------------------------------------------- device steps
    # Pure functions of their inputs and the long-lived tables/caches: they can be
    # captured as CUDA graphs (see model/cuda_graphs.py for the rules they follow).

    def _head(self, h: torch.Tensor, rows: _Rows, noise_on: bool) -> torch.Tensor:
        """Talker output h [B, H] -> codebook 0 [B]; records it in the slot tables."""
        scores = process_talker_logits(
            self.model.codec_logits(h),
            self._generated[rows.slot],
            rows.penalty,
            rows.eos_allowed,
            self._eos_mask,
            self._suppress,
        )
        noise = gumbel_noise(rows.seed, rows.step, 0, 1, scores.shape[-1])[:, 0] if noise_on else None
        tok = draw_rows(scores, rows.talker, noise)
        self._hidden[rows.slot] = h
        self._c0[rows.slot] = tok
        self._generated.index_put_((rows.slot, tok), self._true)
        return tok

    def _talker_step(self, ints: torch.Tensor, floats: torch.Tensor, noise_on: bool = True) -> torch.Tensor:
        """One talker position per row (last frame + next text entry) -> codebook 0 [B]."""
        rows = _Rows(ints, floats)
        x = self.model.frame_embed(self._frames[rows.slot]) + self.model.text_embed(rows.text)  # [B, H]
        h = self.model.talker_forward(x[:, None], self.cache, rows.slot, rows.length)[:, 0]
        return self._head(h, rows, noise_on)

    def _predictor_step(
        self, ints: torch.Tensor, floats: torch.Tensor, noise_on: bool = True
    ) -> torch.Tensor:
        """Codebooks 1..G-1 for each row's codebook 0 -> the frames [B, G]."""
        rows = _Rows(ints, floats)
        predictor = self.model.talker.code_predictor
        c0 = self._c0[rows.slot]
        noise = None
        if noise_on:
            vocab = self.model.cfg.talker.code_predictor.vocab_size
            noise = gumbel_noise(rows.seed, rows.step, 1, predictor.num_groups - 1, vocab)  # [B, G-1, V]

        def choose(logits: torch.Tensor, group: int) -> torch.Tensor:
            return draw_rows(logits, rows.predictor, None if noise is None else noise[:, group - 1])

        rest = predictor.predict(
            self._hidden[rows.slot], self.model.codec_embed(c0), choose, self._predictor_cache
        )
        frames = torch.cat([c0[:, None], rest], dim=1)
        self._frames[rows.slot] = frames
        return frames

    def _run(self, name: str, batch: list[UtteranceState], talker: bool) -> torch.Tensor:
        size = self.fast.bucket(len(batch), self.slots)
        ints, floats = self._pack(batch, size, talker=talker)
        fn = self._talker_step if talker else self._predictor_step
        if not self.fast.captured:
            return fn(ints, floats, self._samples(batch, talker))[: len(batch)]
        step = self._steps.get(name, size, fn, lambda: list(self._pack([], size, talker=talker)))
        return step(ints, floats)[: len(batch)]

    @torch.inference_mode()
    def warmup(self) -> None:
        """Capture the talker and code-predictor steps of every bucket (no-op unless the
        steps are captured). Captures run idle rows only: nothing live is touched."""
        if not self.fast.captured:
            return
        for size in self.fast.bucket_list(self.slots):
            for name, talker in (("talker", True), ("predictor", False)):
                fn = self._talker_step if talker else self._predictor_step
                self._steps.get(
                    name,
                    size,
                    fn,
                    lambda s=size, t=talker: list(self._pack([], s, talker=t)),  # type: ignore[misc]
                )

    # ----------------------------------------------------------------- phases

    def _took_c0(self, st: UtteranceState, tok: int) -> None:
        st.num_sampled += 1
        st.c0 = tok
        st.phase = Phase.FRAME

    def _fits(self, st: UtteranceState, positions: int) -> bool:
        """Room for ``positions`` more talker positions; else the utterance ends ('cap')."""
        if not self.cache.static:
            self.cache.ensure_capacity(st.cache_len + positions)
            return True
        if st.cache_len + positions <= self.cache.capacity:
            return True
        log.warning(
            "utterance in slot %d needs more than max_positions=%d talker positions: finished as 'cap'",
            st.slot,
            self.cache.capacity,
        )
        st.finish_with(FinishReason.CAP)
        return False

    @torch.inference_mode()
    def _prefill(self, st: UtteranceState) -> None:
        dev = self.model.device
        slot = torch.tensor([st.slot], device=dev)
        if st.phase is Phase.PREFIX:
            x = prefix_embeds(self.model, st.voice, st.language_id, st.role_ids)[None]
            if not self._fits(st, x.shape[1]):
                return
            self._generated[st.slot] = False
            self.model.talker_forward(x, self.cache, slot, torch.tensor([0], device=dev))
            st.cache_len = x.shape[1]
            st.phase = Phase.OVERLAY
        ids = st.sched.prompt_ids()
        if ids is None:
            return
        x = prompt_embeds(self.model, st.voice, ids.body, ids.overlay)[None]
        if not self._fits(st, x.shape[1]):
            return
        h = self.model.talker_forward(x, self.cache, slot, torch.tensor([st.cache_len], device=dev))
        st.cache_len += x.shape[1]
        st.positions_consumed = len(ids)
        ints, floats = self._pack([st], 1, talker=True)
        tok = self._head(h[:, -1], _Rows(ints, floats), self._samples([st], talker=True))
        self._took_c0(st, int(tok[0].item()))

    @torch.inference_mode()
    def _advance(self, batch: list[UtteranceState]) -> None:
        """One talker position for each utterance: last frame + next text entry."""
        run = lambda b: self._run("talker", b, talker=True).tolist()  # noqa: E731 - the one host sync of the step
        for st, tok in run_isolated(batch, run, UtteranceState.fail):
            st.cache_len += 1
            st.positions_consumed += 1
            self._took_c0(st, tok)

    @torch.inference_mode()
    def _complete_frames(self, batch: list[UtteranceState]) -> list[tuple[UtteranceState, torch.Tensor]]:
        if not self.fast.static and self._predictor_cache.slots < len(batch):
            self._predictor_cache = self.model.new_predictor_cache(len(batch))
        run = lambda b: list(self._run("predictor", b, talker=False).cpu())  # noqa: E731 - [B] x [G]
        done = run_isolated(batch, run, UtteranceState.fail)
        for st, frame in done:
            st.last_frame = frame
            st.frames_done += 1
            st.c0 = None
            st.phase = Phase.ADVANCE
        return done

    # ----------------------------------------------------------------- the tick

    def tick(self, states: list[UtteranceState]) -> list[tuple[UtteranceState, torch.Tensor]]:
        """Advance every utterance that can advance by at most one frame; returns the
        frames produced, in ``states`` order. Utterances that end are marked DONE; one
        whose step raised ends with ``FinishReason.ERROR`` and the others move on."""
        for st in states:
            if st.phase in (Phase.PREFIX, Phase.OVERLAY):
                try:
                    self._ensure_capacity(st)
                    self._prefill(st)
                except Exception as e:
                    st.fail(e)
        ready = []
        for st in states:
            if st.phase is not Phase.ADVANCE:
                continue
            if st.frames_done >= st.max_frames:
                st.finish_with(FinishReason.CAP)
            elif st.sched.step_id(st.frames_done - 1) is not None and self._fits(st, 1):
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
        return self._complete_frames(to_complete)

    def _ensure_capacity(self, st: UtteranceState) -> None:
        """Dynamic cache: grow ahead of need (static caches are checked by ``_fits``)."""
        if self.cache.static:
            return
        need = st.cache_len + st.voice.overlay_len + 64
        if st.sched.non_streaming_mode:  # the whole text is prefilled at once
            need += len(st.sched.ref_ids) + len(st.sched.text_ids) + 1
        if st.phase is Phase.PREFIX:
            need += 64 + len(st.voice.instruct_ids)
        self.cache.ensure_capacity(need)
