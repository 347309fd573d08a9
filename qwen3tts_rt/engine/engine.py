"""The streaming engine: sessions fed text token by token, one device worker thread.

``Engine`` owns the model and a single worker thread. Callers (gRPC handlers on an
asyncio loop, CLIs, tests) talk to it only through ``Session`` methods, which enqueue
commands and return at once, and through each session's output ``Channel``. The worker
applies the commands, then runs one ``FrameGenerator.tick`` over every live utterance
(one batched talker step + batched code-predictor steps), decodes the new frames in one
batched step of the streaming decoder (each session's state lives in its slot of a
``DecoderPool``), and emits PCM packets.

On CUDA the steps run the fast path by default (static KV cache, batch buckets, CUDA
graphs captured by ``warmup()``): see ``EngineConfig`` and ``model/cuda_graphs.py``.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qwen3tts_rt.engine.channel import Channel
from qwen3tts_rt.engine.generation import (
    FinishReason,
    FrameCap,
    FrameGenerator,
    Phase,
    UtteranceState,
    run_isolated,
)
from qwen3tts_rt.engine.incremental_tokenizer import IncrementalTokenizer
from qwen3tts_rt.engine.messages import EngineMessage, PcmPacket, SessionClosed, SessionError, UtteranceDone
from qwen3tts_rt.engine.synth import new_utterance
from qwen3tts_rt.errors import CapacityError, InvalidInputError, TextTooLongError, UnavailableError
from qwen3tts_rt.model.checkpoint import Checkpoint
from qwen3tts_rt.model.cuda_graphs import DEFAULT_MAX_POSITIONS, FastPath
from qwen3tts_rt.model.decoder_pool import DecoderPool
from qwen3tts_rt.model.prompt import VoicePrompt, check_voice, resolve_language
from qwen3tts_rt.model.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_sessions: int = 16  # live sessions (each holds one talker KV slot)
    first_packet_frames: int = 1  # frames in the first packet of an utterance
    packet_frames: int = 1  # frames in each later packet
    max_utterance_chars: int = 20_000  # text per utterance
    # Backpressure: a session with this many unread packets in its output channel is not
    # stepped until its client reads (memory per session stays bounded; the others go on).
    max_buffered_packets: int = 256
    max_pending_utterances: int = 32  # utterances queued by flushes, the speaking one included
    frame_cap: FrameCap = field(
        default_factory=FrameCap
    )  # frames per utterance: base + per_token * text tokens
    idle_wait_s: float = 0.02  # worker wait when nothing can move
    # --- the fast path (model/cuda_graphs.py). None: on for CUDA, off on CPU.
    static_kv: bool | None = None  # preallocated KV caches, steps padded to batch buckets
    cuda_graphs: bool | None = None  # replay the bucketed steps as CUDA graphs (CUDA + static_kv only)
    max_positions: int = DEFAULT_MAX_POSITIONS  # talker positions per slot in the static cache
    batch_buckets: tuple[int, ...] = ()  # () = 1, 2, 4, ... up to max_sessions
    attention: str = "auto"  # 'auto' (flash-attn when usable, else SDPA), 'sdpa' or 'flash'

    def validated(self) -> EngineConfig:
        for name in (
            "max_sessions",
            "first_packet_frames",
            "packet_frames",
            "max_utterance_chars",
            "max_buffered_packets",
            "max_pending_utterances",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1")
        return self

    def fast_path(self, device: torch.device) -> FastPath:
        return FastPath.resolve(
            device,
            static=self.static_kv,
            cuda_graphs=self.cuda_graphs,
            max_positions=self.max_positions,
            buckets=self.batch_buckets,
            attention=self.attention,
        )


@dataclass
class _Utterance:
    uid: int
    tokenizer: IncrementalTokenizer
    seed: int | None
    client_id: str = ""
    state: UtteranceState | None = None
    text_ended: bool = False
    chars: int = 0
    char_ends: list[int] = field(default_factory=list)  # end offset of each text token
    first_delta_at: float | None = None
    first_packet_at: float | None = None
    compute_s: float = 0.0
    frames: int = 0
    samples: int = 0
    pending: list[np.ndarray] = field(default_factory=list)
    pending_codes: list[np.ndarray] = field(default_factory=list)
    pending_from: int = 0
    ids_before_start: list[int] = field(default_factory=list)  # text ids that arrived before a slot
    # generation finished (EOS, or the max_new_tokens cap) before the text ended: the slot is
    # free, later text of this utterance is not spoken, and its UtteranceDone waits for the
    # end of its text (flush/end), so that it carries the flush's client id
    ended_early: FinishReason | None = None


class Session:
    """One client stream. Thread-safe; every method returns immediately."""

    def __init__(
        self,
        engine: Engine,
        sid: int,
        voice: VoicePrompt,
        language: str,
        params: SamplingParams,
        seed: int | None,
        first_packet_frames: int,
        packet_frames: int,
    ) -> None:
        self.engine = engine
        self.id = sid
        self.voice = voice
        self.language = language
        self.params = params
        self.seed = seed
        self.first_packet_frames = first_packet_frames
        self.packet_frames = packet_frames
        self.out: Channel[EngineMessage] = Channel()
        self.opened_at = time.perf_counter()
        # worker-side state
        self._utterances: list[_Utterance] = []
        self._uids = itertools.count()
        self._seq = 0
        self._closed = False
        self._close_when_done = False

    # ------------------------------------------------------------------ client API

    def push_text(self, delta: str) -> None:
        self.engine._command(self, "text", delta)

    def end_text(self) -> None:
        """End of text: finish speaking, then the session closes."""
        self.engine._command(self, "end", None)

    def flush(self, client_id: str = "") -> None:
        """End the current utterance; later text starts the next one (same voice)."""
        self.engine._command(self, "flush", client_id)

    def cancel(self) -> None:
        """Barge-in: stop speaking within one frame and drop queued audio."""
        self.engine._command(self, "cancel", None)

    def close(self) -> None:
        """Drop everything and free the slot (client went away). Safe to call twice."""
        self.engine._command(self, "close", None)

    def messages(self, timeout: float | None = None) -> Iterator[EngineMessage]:
        """Blocking iterator over output messages until the session closes."""
        while True:
            msg = self.out.get(timeout)
            yield msg
            if isinstance(msg, (SessionClosed, SessionError)):
                return


class Engine:
    def __init__(self, ckpt: Checkpoint, config: EngineConfig | None = None) -> None:
        self.ckpt = ckpt
        self.config = (config or EngineConfig()).validated()
        self.fast = self.config.fast_path(ckpt.model.device)
        self._gen = FrameGenerator(ckpt.model, self.config.max_sessions, self.fast)
        codec = ckpt.codec
        self._dec = DecoderPool(codec.decoder, self.config.max_sessions, self.fast, codec.device, codec.dtype)
        self._free_slots = list(range(self.config.max_sessions))
        self._commands: queue.SimpleQueue[tuple[Session | None, str, Any]] = queue.SimpleQueue()
        self._sessions: dict[int, Session] = {}
        self._waiting: list[tuple[Session, _Utterance]] = []  # utterances without a slot yet
        self._sids = itertools.count(1)
        self._lock = threading.Lock()
        self._live = 0
        self._stop = threading.Event()
        # Observer called on the worker thread after each tick that moved: (batch size, seconds).
        self.on_tick: Callable[[int, float], None] | None = None
        self._thread = threading.Thread(target=self._run, name="qwen3tts-device", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public

    @property
    def live_sessions(self) -> int:
        with self._lock:
            return self._live

    @property
    def free_slots(self) -> int:
        """Generation slots not held by an utterance (``max_sessions`` when idle). Read from
        another thread it is a snapshot: the worker may take or free a slot meanwhile."""
        return len(self._free_slots)

    def open_session(
        self,
        voice: VoicePrompt,
        language: str = "auto",
        params: SamplingParams | None = None,
        *,
        seed: int | None = None,
        first_packet_frames: int | None = None,
        packet_frames: int | None = None,
    ) -> Session:
        """Validate the request and open a session; raises InvalidInputError on bad
        input and CapacityError when ``max_sessions`` sessions are live."""
        check_voice(self.ckpt.model, voice)
        resolve_language(self.ckpt.model, language, voice.speaker)
        params = (params or SamplingParams.from_generation_config(self.ckpt.generation_config)).validated()
        fp = self.config.first_packet_frames if first_packet_frames is None else first_packet_frames
        pf = self.config.packet_frames if packet_frames is None else packet_frames
        for name, v in (("first_packet_frames", fp), ("packet_frames", pf)):
            if not 1 <= v <= 100:
                raise InvalidInputError(f"{v} is out of range: 1 <= {name} <= 100", field=name)
        if self._stop.is_set() or not self._thread.is_alive():
            raise UnavailableError("the engine has stopped; see the server log")
        with self._lock:
            if self._live >= self.config.max_sessions:
                raise CapacityError(
                    f"server at its limit of {self.config.max_sessions} live sessions (max_sessions); retry later"
                )
            self._live += 1
        s = Session(self, next(self._sids), voice, language, params, seed, fp, pf)
        self._commands.put((s, "open", None))
        return s

    def warmup(self, timeout: float | None = None) -> None:
        """Capture the CUDA graphs of every batch bucket (talker step, code predictor,
        decoder) on the device thread; blocks until done. Call it before reporting SERVING:
        a bucket first met without it is captured then, stalling that tick. Nothing to do
        on the eager paths (CPU). Safe to call twice."""
        done = threading.Event()
        failed: list[BaseException] = []

        def capture() -> None:
            try:
                self._gen.warmup()
                self._dec.warmup()
            except BaseException as e:  # handed to the caller
                failed.append(e)
            finally:
                done.set()

        self._commands.put((None, "call", capture))
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done.wait(0.1):
            if self._stop.is_set() or not self._thread.is_alive():
                raise RuntimeError("the engine stopped before its warm-up finished")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"warm-up took more than {timeout} s")
        if failed:
            raise failed[0]

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the worker; sessions still open get a SessionError. Safe to call twice."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker side

    def _command(self, s: Session, op: str, arg: Any) -> None:
        self._commands.put((s, op, arg))

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while not self._stop.is_set():
                busy = self._tick()
                self._drain(block=not busy)
        except Exception:  # pragma: no cover - a bug in the worker itself
            log.exception("device worker crashed")
            for s in list(self._sessions.values()):
                s.out.put(SessionError("the device worker stopped; see the server log"))
        finally:
            for s in list(self._sessions.values()):
                s.out.put(SessionError("server shutting down", kind="unavailable"))

    def _drain(self, block: bool) -> None:
        try:
            item = (
                self._commands.get(timeout=self.config.idle_wait_s) if block else self._commands.get_nowait()
            )
        except queue.Empty:
            return
        while True:
            self._apply(*item)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, s: Session | None, op: str, arg: Any) -> None:
        if s is None:  # work for the device thread itself
            if op == "call":
                arg()
            return
        if s._closed:
            return
        try:
            if op == "open":
                self._sessions[s.id] = s
                self._new_utterance(s)
            elif op == "text":
                self._push_text(s, arg)
            elif op == "flush":
                self._end_current_text(s, client_id=arg)
                self._new_utterance(s)
            elif op == "end":
                self._end_current_text(s)
                s._close_when_done = True
                self._maybe_close(s)
            elif op == "cancel":
                self._cancel(s)
                self._new_utterance(s)
            elif op == "close":
                self._cancel(s, emit=False)
                self._close(s)
        except (InvalidInputError, CapacityError) as e:
            self._fail(s, str(e), kind="invalid" if isinstance(e, InvalidInputError) else "capacity")
        except Exception as e:  # a bug met by one session's command ends that session only
            log.exception("session %d: command %r failed", s.id, op)
            self._fail(s, f"{op} failed: {type(e).__name__}: {e}")

    def _fail(self, s: Session, message: str, kind: str = "internal") -> None:
        """End session ``s`` with a ``SessionError``; its slot is freed, others go on."""
        s.out.put(SessionError(message, kind=kind))
        self._cancel(s, emit=False)
        self._close(s, send_closed=False)

    # --- utterance bookkeeping

    def _new_utterance(self, s: Session) -> _Utterance:
        limit = self.config.max_pending_utterances
        if len(s._utterances) >= limit:
            raise CapacityError(
                f"{limit} utterances are already queued on this stream (max_pending_utterances); "
                "wait for their utterance_done before flushing more"
            )
        k = next(s._uids)
        seed = None if s.seed is None else s.seed + k
        u = _Utterance(uid=k, tokenizer=IncrementalTokenizer(self.ckpt.tokenizer), seed=seed)
        s._utterances.append(u)
        if len(s._utterances) == 1:
            self._start(s, u)
        return u

    def _start(self, s: Session, u: _Utterance) -> None:
        if not self._free_slots:
            self._waiting.append((s, u))
            return
        slot = self._free_slots.pop(0)
        u.state = new_utterance(self.ckpt, s.voice, s.language, s.params, seed=u.seed, slot=slot)
        self._dec.reset(slot)
        if s.voice.ref_codes is not None:  # continue the audio of the reference
            self._dec.prime(slot, s.voice.ref_codes)
        u.state.sched.push(u.ids_before_start)  # text that arrived while it waited for a slot
        u.ids_before_start = []
        if u.text_ended:
            u.state.sched.end()
            u.state.max_frames = self.config.frame_cap.frames(s.params, len(u.char_ends))

    def _feed(self, u: _Utterance, ids: list[int]) -> None:
        u.char_ends.extend(u.tokenizer.char_ends[len(u.char_ends) : len(u.char_ends) + len(ids)])
        if u.state is not None:
            u.state.sched.push(ids)
        else:
            u.ids_before_start.extend(ids)

    def _push_text(self, s: Session, delta: str) -> None:
        u = s._utterances[-1]
        if u.text_ended:
            u = self._new_utterance(s)
        if u.ended_early is not None:
            return  # its generation has finished: the rest of its text is not spoken
        if u.chars + len(delta) > self.config.max_utterance_chars:
            raise TextTooLongError(
                f"utterance text exceeds {self.config.max_utterance_chars} characters "
                "(max_utterance_chars); flush between sentences",
                field="text",
            )
        if u.first_delta_at is None:
            u.first_delta_at = time.perf_counter()
        u.chars += len(delta)
        self._feed(u, u.tokenizer.push(delta))

    def _end_current_text(self, s: Session, client_id: str = "") -> None:
        u = s._utterances[-1]
        if u.text_ended:
            return
        if u.ended_early is not None:
            u.text_ended = True
            u.client_id = client_id
            self._finish(s, u, u.ended_early)
            return
        self._feed(u, u.tokenizer.end())
        u.text_ended = True
        u.client_id = client_id
        if not u.char_ends:  # nothing to say: finish without audio
            self._finish(s, u, FinishReason.EOS)
            return
        if u.state is not None:
            u.state.sched.end()
            u.state.max_frames = self.config.frame_cap.frames(s.params, len(u.char_ends))

    def _cancel(self, s: Session, emit: bool = True) -> None:
        for u in list(s._utterances):
            self._finish(s, u, FinishReason.CANCELLED, emit=emit)
        s._utterances.clear()
        s.out.drop(lambda m: isinstance(m, PcmPacket))

    def _finish(self, s: Session, u: _Utterance, reason: FinishReason, emit: bool = True) -> None:
        if reason is not FinishReason.CANCELLED and not u.text_ended and u.ended_early is None:
            self._flush_packet(s, u)  # generation ended before the text: free the slot now
            if u.state is not None:
                self._free_slots.append(u.state.slot)
                u.state.phase = Phase.DONE
                u.state = None
                self._admit_waiting()
            u.ended_early = reason
            return
        if reason is not FinishReason.CANCELLED:
            self._flush_packet(s, u)
        if u.state is not None:
            self._free_slots.append(u.state.slot)
            u.state.phase = Phase.DONE
            u.state = None
            self._admit_waiting()
        else:
            self._waiting = [(ws, wu) for ws, wu in self._waiting if wu is not u]
        if u in s._utterances:
            s._utterances.remove(u)
        if reason is FinishReason.CAP:
            log.warning(
                "session %d utterance %d hit the frame cap (%d frames): no EOS", s.id, u.uid, u.frames
            )
        if emit and (u.frames or u.chars or u.client_id):  # an utterance with no text stays silent
            audio_s = u.samples / self.ckpt.codec.sample_rate
            latency = None
            if u.first_packet_at is not None and u.first_delta_at is not None:
                latency = u.first_packet_at - u.first_delta_at
            s.out.put(
                UtteranceDone(
                    utterance_id=u.uid,
                    reason=reason.value,
                    frames=u.frames,
                    audio_seconds=audio_s,
                    first_packet_latency_s=latency,
                    rtf=(u.compute_s / audio_s) if audio_s > 0 else None,
                    client_id=u.client_id,
                    timings={"compute_s": u.compute_s},
                )
            )
        head = s._utterances[0] if s._utterances else None
        if (
            head is not None
            and head.state is None
            and head.ended_early is None
            and (s, head) not in self._waiting
        ):
            self._start(s, head)
        self._maybe_close(s)

    def _admit_waiting(self) -> None:
        while self._free_slots and self._waiting:
            ws, wu = self._waiting.pop(0)
            self._start(ws, wu)

    def _maybe_close(self, s: Session) -> None:
        if s._close_when_done and not s._utterances:
            self._close(s)

    def _close(self, s: Session, send_closed: bool = True) -> None:
        if s._closed:
            return
        s._closed = True
        self._sessions.pop(s.id, None)
        with self._lock:
            self._live -= 1
        if send_closed:
            s.out.put(SessionClosed())

    # --- packets

    def _emit_frame_audio(self, s: Session, u: _Utterance, pcm: np.ndarray, frame: np.ndarray) -> None:
        u.pending.append(pcm)
        u.pending_codes.append(frame)
        u.frames += 1
        want = s.first_packet_frames if u.first_packet_at is None else s.packet_frames
        if len(u.pending) >= want:
            self._flush_packet(s, u)

    def _flush_packet(self, s: Session, u: _Utterance) -> None:
        if not u.pending:
            return
        pcm = np.concatenate(u.pending)
        now = time.perf_counter()
        consumed_tokens = 0
        if u.state is not None:
            consumed_tokens = u.state.sched.text_tokens_consumed(u.state.positions_consumed)
        chars = u.char_ends[consumed_tokens - 1] if consumed_tokens else 0
        s.out.put(
            PcmPacket(
                utterance_id=u.uid,
                seq=s._seq,
                sample_offset=u.samples,
                frame_start=u.pending_from,
                frame_end=u.pending_from + len(u.pending),
                pcm=pcm,
                codes=np.stack(u.pending_codes),
                chars_consumed=chars,
                emitted_at=now,
            )
        )
        if u.first_packet_at is None:
            u.first_packet_at = now
        s._seq += 1
        u.samples += len(pcm)
        u.pending_from += len(u.pending)
        u.pending = []
        u.pending_codes = []

    def _tick(self) -> bool:
        """One generation tick over every live utterance; True if anything moved."""
        live: list[tuple[Session, _Utterance]] = []
        backlog = self.config.max_buffered_packets
        for s in self._sessions.values():
            if s._utterances and s._utterances[0].state is not None and len(s.out) < backlog:
                live.append((s, s._utterances[0]))
        if not live:
            return False
        states = [u.state for _, u in live]
        phases = [st.phase for st in states]  # type: ignore[union-attr]
        t0 = time.perf_counter()
        try:
            produced = self._gen.tick(states)  # type: ignore[arg-type]
        except Exception as e:
            log.exception("generation step failed")
            for s, _ in live:
                self._fail(s, f"generation failed: {type(e).__name__}: {e}")
            return True
        by_state = {id(u.state): (s, u) for s, u in live}
        failed: dict[int, str] = {}  # session id -> message: faults of one session end only it

        def decode(rows: list[tuple[UtteranceState, torch.Tensor]]) -> list[np.ndarray]:
            frames = torch.stack([frame for _, frame in rows])  # [n, G]
            return list(self._dec.step([st.slot for st, _ in rows], frames).float().cpu().numpy())

        def decode_failed(row: tuple[UtteranceState, torch.Tensor], e: Exception) -> None:
            log.error("decoding a frame of slot %d failed", row[0].slot, exc_info=e)
            failed[by_state[id(row[0])][0].id] = f"decoding failed: {type(e).__name__}: {e}"

        for (st, frame), pcm in run_isolated(produced, decode, decode_failed):
            s, u = by_state[id(st)]
            try:
                self._emit_frame_audio(s, u, pcm, frame.numpy().astype(np.int64))
            except Exception as e:
                log.exception("emitting audio of session %d failed", s.id)
                failed[s.id] = f"emitting audio failed: {type(e).__name__}: {e}"
        elapsed = time.perf_counter() - t0
        moved = bool(produced) or any(st.phase is not ph for st, ph in zip(states, phases))  # type: ignore[union-attr]
        if moved:
            for _, u in live:
                u.compute_s += elapsed / len(live)
            if self.on_tick is not None:
                self.on_tick(len(live), elapsed)
        for s, u in live:
            done = u.state
            if done is not None and done.finish is FinishReason.ERROR:
                err = done.error
                failed.setdefault(s.id, f"generation failed: {type(err).__name__}: {err}")
            if s.id in failed:
                self._fail(s, failed[s.id])
            elif done is not None and done.phase is Phase.DONE and done.finish is not None:
                self._finish(s, u, done.finish)
        return moved
