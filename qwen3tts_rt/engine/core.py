"""The session table: every rule about sessions and utterances, and no tensors.

It takes typed commands (``Open``, ``Text``, ``Begin``, ``Flush``, ``Cancel``, ``End``,
``Close``) and emits ordered typed messages (``engine/messages.py``) into each
session's output channel. It owns:

* admission (live sessions <= ``max_sessions``) and the generation slots: only the head
  utterance of a session holds a slot; heads without one wait in one FIFO queue;
* the utterance queue of each session, its bound (``max_pending_utterances``) and the
  text bound per utterance (``max_utterance_chars``);
* text intake: cleaning, leading silence held back, the nothing-to-say rule
  (``engine/text.py``), incremental tokenization;
* utterance identity: ids numbered from 0 per session, client keys, flush client ids;
  every message of an utterance carries both;
* packetising: generated frames are held until the session's ``PacketPolicy``
  (``engine/packets.py``) lets them go, then decoded together by the device loop
  (``to_decode`` / ``on_decoded``); the listener's playback clock per session; output
  backpressure (a session with ``max_buffered_packets`` unread is not stepped);
* ``UtteranceDone`` exactly once per utterance that had text or a name, strictly in
  utterance order (an utterance cancelled while queued reports after those before it).

The device side is reached only through a ``Backend`` (start / push / end / release /
consumed), so the table runs in tests with a fake backend, in milliseconds; the device
loop (``engine/engine.py``) drives it on the device thread and is its only caller apart
from ``reserve`` (thread-safe admission).
"""

from __future__ import annotations

import collections
import itertools
import logging
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from qwen3tts_rt.engine.channel import Channel
from qwen3tts_rt.engine.messages import EngineMessage, PcmPacket, SessionClosed, SessionError, UtteranceDone
from qwen3tts_rt.engine.packets import PacketPolicy
from qwen3tts_rt.engine.text import clean_text, has_speech
from qwen3tts_rt.errors import CapacityError, InvalidInputError, TextTooLongError

log = logging.getLogger(__name__)


class Tokenizer(Protocol):
    @property
    def char_ends(self) -> Sequence[int]: ...

    def push(self, delta: str) -> list[int]: ...

    def end(self) -> list[int]: ...


@dataclass(frozen=True)
class UtteranceOptions:
    """Per-utterance settings; each one that is not None overrides the session's."""

    voice: Any = None  # a VoicePrompt
    language: str | None = None
    params: Any = None  # SamplingParams
    seed: int | None = None
    non_streaming_mode: bool | None = None  # True: the official whole-text layout


@dataclass(frozen=True)
class SessionSpec:
    """A session's defaults (validated by the engine before ``Open``)."""

    voice: Any
    language: str
    params: Any
    seed: int | None
    packets: PacketPolicy
    non_streaming_mode: bool = False


# ---------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Open:
    sid: int
    spec: SessionSpec
    out: Channel[EngineMessage]


@dataclass(frozen=True)
class Text:
    sid: int
    delta: str
    at: float | None = None  # when the caller sent it (the table's clock); None: when applied


@dataclass(frozen=True)
class Begin:
    sid: int
    key: str
    options: UtteranceOptions


@dataclass(frozen=True)
class Flush:
    sid: int
    client_id: str = ""


@dataclass(frozen=True)
class Cancel:
    sid: int
    key: str | None = None  # None: every utterance of the session


@dataclass(frozen=True)
class End:
    sid: int


@dataclass(frozen=True)
class Close:
    sid: int


Command = Open | Text | Begin | Flush | Cancel | End | Close


# ---------------------------------------------------------------------------- state


@dataclass
class Utterance:
    sid: int
    uid: int
    key: str
    voice: Any
    language: str
    params: Any
    seed: int | None
    non_streaming_mode: bool
    tokenizer: Tokenizer
    slot: int | None = None
    handle: Any = None  # the backend's generation state while it holds a slot
    client_id: str = ""
    text_ended: bool = False
    held: str = ""  # leading silence, sent once something to say follows
    spoken: bool = False  # the text has something to say
    chars: int = 0  # characters given to the tokenizer
    ids: list[int] = field(default_factory=list)  # text token ids so far
    first_delta_at: float | None = None
    first_packet_at: float | None = None
    compute_s: float = 0.0
    frames: int = 0
    samples: int = 0
    pending_codes: list[np.ndarray] = field(default_factory=list)  # generated, not decoded yet
    pending_from: int = 0
    # when its recent frames were generated (since it last waited for text): its pace
    frame_times: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=9))
    # generation ended (EOS / cap) before the text did: the slot is free, later text is not
    # spoken, and the utterance finishes with this reason when its text ends
    ended_early: str | None = None
    finish: str | None = None  # set once finished; reported when it reaches the head

    @property
    def named(self) -> bool:
        return bool(self.key or self.client_id)

    @property
    def token_ends(self) -> Sequence[int]:
        return self.tokenizer.char_ends[: len(self.ids)]


@dataclass
class SessionState:
    sid: int
    spec: SessionSpec
    out: Channel[EngineMessage]
    utterances: collections.deque[Utterance] = field(default_factory=collections.deque)
    uids: itertools.count[int] = field(default_factory=itertools.count)
    seq: int = 0  # packet number within the session
    # the listener's playback: when the audio sent so far ends if played from the first
    # packet on without a gap (the table's clock; None before the first packet)
    play_until: float | None = None
    closing: bool = False  # end of text: close once every utterance is done
    # the utterance text went to was cancelled by key: its later text is dropped until
    # the next begin / flush (numbering and seeds of later utterances stay as they were)
    discarding: bool = False

    @property
    def current(self) -> Utterance | None:
        """The utterance text goes to (None: the next text starts a new one)."""
        if self.utterances and not self.utterances[-1].text_ended:
            return self.utterances[-1]
        return None


class Backend(Protocol):
    """The device side of an utterance (called on the device thread only)."""

    def start(self, u: Utterance) -> None:
        """``u.slot`` was given to ``u``: set ``u.handle`` (its generation state)."""

    def push(self, u: Utterance, ids: list[int]) -> None:
        """Text token ids of ``u`` (after ``start``)."""

    def end(self, u: Utterance) -> None:
        """The text of ``u`` has ended (``len(u.ids)`` tokens in all)."""

    def release(self, u: Utterance) -> None:
        """``u`` gives back its slot (finished, cancelled, or its session failed)."""

    def consumed(self, u: Utterance) -> int:
        """Text tokens of ``u`` the talker has read."""


@dataclass(frozen=True)
class TableLimits:
    max_sessions: int = 16
    max_pending_utterances: int = 32
    max_utterance_chars: int = 20_000
    max_buffered_packets: int = 256


class SessionTable:
    def __init__(
        self,
        limits: TableLimits,
        backend: Backend,
        new_tokenizer: Callable[[], Tokenizer],
        *,
        sample_rate: int = 24000,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.limits = limits
        self.backend = backend
        self.new_tokenizer = new_tokenizer
        self.sample_rate = sample_rate
        self.clock = clock
        self.free_slots: list[int] = list(range(limits.max_sessions))
        self.sessions: dict[int, SessionState] = {}
        self.waiting: collections.deque[Utterance] = collections.deque()  # heads without a slot
        self._live = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ admission (any thread)

    @property
    def live(self) -> int:
        with self._lock:
            return self._live

    def reserve(self) -> None:
        """Count a new session in, or raise ``CapacityError``."""
        with self._lock:
            if self._live >= self.limits.max_sessions:
                raise CapacityError(
                    f"server at its limit of {self.limits.max_sessions} live sessions (max_sessions); "
                    "retry later"
                )
            self._live += 1

    def _unreserve(self) -> None:
        with self._lock:
            self._live -= 1

    # ------------------------------------------------------------------ commands

    def apply(self, cmd: Command) -> None:
        if isinstance(cmd, Open):
            s = SessionState(cmd.sid, cmd.spec, cmd.out)
            self.sessions[cmd.sid] = s
            self._guard(s, lambda: self._new_utterance(s))
            return
        s2 = self.sessions.get(cmd.sid)
        if s2 is None:
            return  # closed or failed: later commands of the stream are moot
        self._guard(s2, lambda: self._dispatch(s2, cmd))

    def _guard(self, s: SessionState, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except (InvalidInputError, CapacityError) as e:
            self.fail(s.sid, str(e), kind="invalid" if isinstance(e, InvalidInputError) else "capacity")
        except Exception as e:  # a bug met by one session's command ends that session only
            log.exception("session %d: command failed", s.sid)
            self.fail(s.sid, f"command failed: {type(e).__name__}: {e}")

    def _dispatch(self, s: SessionState, cmd: Command) -> None:
        if isinstance(cmd, Text):
            self._text(s, cmd.delta, cmd.at)
        elif isinstance(cmd, Begin):
            self._begin(s, cmd.key, cmd.options)
        elif isinstance(cmd, Flush):
            if not s.discarding:
                self._end_text(s, cmd.client_id)
            s.discarding = False
            self._new_utterance(s)
        elif isinstance(cmd, Cancel):
            self._cancel(s, cmd.key)
        elif isinstance(cmd, End):
            self._end_text(s, "")
            s.closing = True
            self._settle(s)
        elif isinstance(cmd, Close):
            self._drop(s)
            self._close(s)  # SessionClosed wakes a reader still waiting

    # ------------------------------------------------------------------ utterances

    def _new_utterance(
        self, s: SessionState, key: str = "", options: UtteranceOptions | None = None
    ) -> Utterance:
        limit = self.limits.max_pending_utterances
        if len(s.utterances) >= limit:
            raise CapacityError(
                f"{limit} utterances are already queued on this stream (max_pending_utterances); "
                "wait for their utterance_done before flushing more"
            )
        uid = next(s.uids)
        u = Utterance(s.sid, uid, key, tokenizer=self.new_tokenizer(), **self._settings(s, uid, options))
        s.utterances.append(u)
        if len(s.utterances) == 1:
            self._start(u)
        return u

    @staticmethod
    def _settings(s: SessionState, uid: int, o: UtteranceOptions | None) -> dict[str, Any]:
        sp = s.spec
        o = o or UtteranceOptions()
        seed = o.seed if o.seed is not None else (None if sp.seed is None else sp.seed + uid)
        return {
            "voice": sp.voice if o.voice is None else o.voice,
            "language": sp.language if o.language is None else o.language,
            "params": sp.params if o.params is None else o.params,
            "seed": seed,
            "non_streaming_mode": sp.non_streaming_mode
            if o.non_streaming_mode is None
            else o.non_streaming_mode,
        }

    def _begin(self, s: SessionState, key: str, options: UtteranceOptions) -> None:
        s.discarding = False
        u = s.current
        if u is not None and not u.chars and not u.held and not u.named and u.ended_early is None:
            # the fresh utterance text would go to: it takes the key and the options
            if u.slot is not None:
                self.backend.release(u)
                u.handle = None
            u.key = key
            for name, value in self._settings(s, u.uid, options).items():
                setattr(u, name, value)
            if u.slot is not None:
                self.backend.start(u)  # prefilled again with its own voice
            return
        if u is not None:
            self._end_text(s, "")
        self._new_utterance(s, key, options)

    def _start(self, u: Utterance) -> None:
        """Give the head utterance ``u`` a slot, or queue it for one."""
        if not self.free_slots:
            self.waiting.append(u)
            return
        u.slot = self.free_slots.pop(0)
        self.backend.start(u)
        if u.ids:
            self.backend.push(u, list(u.ids))
        if u.text_ended:
            self.backend.end(u)

    def _text(self, s: SessionState, delta: str, at: float | None = None) -> None:
        if s.discarding:
            return
        u = s.current or self._new_utterance(s)
        if u.ended_early is not None:
            return  # its generation has finished: the rest of its text is not spoken
        delta = clean_text(delta)
        if u.chars + len(u.held) + len(delta) > self.limits.max_utterance_chars:
            raise TextTooLongError(
                f"utterance text exceeds {self.limits.max_utterance_chars} characters "
                "(max_utterance_chars); flush between sentences",
                field="text",
            )
        if not u.spoken:
            u.held += delta
            if not has_speech(u.held):
                return
            delta, u.held = u.held, ""
            u.spoken = True
        if delta:
            if u.first_delta_at is None:  # the first text with something to say
                u.first_delta_at = self.clock() if at is None else at
            u.chars += len(delta)
            self._feed(u, u.tokenizer.push(delta))

    def _feed(self, u: Utterance, ids: list[int]) -> None:
        if not ids:
            return
        u.ids.extend(ids)
        if u.handle is not None:
            self.backend.push(u, ids)

    def _end_text(self, s: SessionState, client_id: str) -> None:
        u = s.current
        if u is None:
            return
        u.text_ended = True
        u.client_id = client_id
        u.held = ""
        if u.ended_early is not None:
            self._finish(s, u, u.ended_early)
            return
        if u.spoken:
            self._feed(u, u.tokenizer.end())
        if not u.ids:  # nothing to say: finished without audio
            self._finish(s, u, "eos")
            return
        if u.handle is not None:
            self.backend.end(u)

    def _cancel(self, s: SessionState, key: str | None) -> None:
        hit = [u for u in s.utterances if u.finish is None and (key is None or u.key == key)]
        reopen = s.current is not None and s.current in hit
        for u in hit:
            u.text_ended = True
            self._finish(s, u, "cancelled")
        uids = {u.uid for u in hit}
        s.out.drop(lambda m: isinstance(m, PcmPacket) and m.utterance_id in uids)
        if key is None:  # barge-in: the next text starts a new utterance at once
            s.discarding = False
            self._new_utterance(s)
        elif reopen:
            s.discarding = True

    def _drop(self, s: SessionState) -> None:
        """Release everything the session holds, reporting nothing."""
        for u in s.utterances:
            self._release(u)
        s.utterances.clear()

    def _release(self, u: Utterance) -> None:
        if u.slot is not None:
            self.backend.release(u)
            self.free_slots.append(u.slot)
            u.slot = None
            u.handle = None
            self._admit()
        elif u in self.waiting:
            self.waiting.remove(u)

    def _admit(self) -> None:
        while self.free_slots and self.waiting:
            self._start(self.waiting.popleft())

    def _finish(self, s: SessionState, u: Utterance, reason: str) -> None:
        if reason != "cancelled" and not u.text_ended:
            # generation ended before the text: free the slot now, report at the text's end
            self._drop_held(s, u, reason)
            self._release(u)
            u.ended_early = reason
            return
        self._drop_held(s, u, reason)
        self._release(u)
        u.finish = reason
        if reason == "cap":
            log.warning(
                "session %d utterance %d hit the frame cap (%d frames): no EOS", s.sid, u.uid, u.frames
            )
        self._settle(s)

    def _settle(self, s: SessionState) -> None:
        """Report finished utterances from the head, start the new head, close if done."""
        while s.utterances and s.utterances[0].finish is not None:
            u = s.utterances.popleft()
            if u.spoken or u.named:
                s.out.put(self._done(u))
        head = s.utterances[0] if s.utterances else None
        if head is not None and head.slot is None and head.ended_early is None and head not in self.waiting:
            self._start(head)
        if s.closing and not s.utterances:
            self._close(s)

    def _done(self, u: Utterance) -> UtteranceDone:
        audio_s = u.samples / self.sample_rate
        latency = None
        if u.first_packet_at is not None and u.first_delta_at is not None:
            latency = u.first_packet_at - u.first_delta_at
        assert u.finish is not None
        return UtteranceDone(
            utterance_id=u.uid,
            key=u.key,
            reason=u.finish,
            frames=u.frames,
            audio_seconds=audio_s,
            first_packet_latency_s=latency,
            rtf=(u.compute_s / audio_s) if audio_s > 0 else None,
            client_id=u.client_id,
            timings={"compute_s": u.compute_s},
        )

    def _close(self, s: SessionState, send_closed: bool = True) -> None:
        if self.sessions.pop(s.sid, None) is None:
            return
        self._unreserve()
        if send_closed:
            s.out.put(SessionClosed())

    def fail(self, sid: int, message: str, kind: str = "internal") -> None:
        """End session ``sid`` with a ``SessionError``; its slot is freed, others go on."""
        s = self.sessions.get(sid)
        if s is None:
            return
        s.out.put(SessionError(message, kind=kind))
        self._drop(s)
        self._close(s, send_closed=False)

    def shutdown(self, message: str, kind: str = "unavailable") -> None:
        for sid in list(self.sessions):
            self.fail(sid, message, kind)

    # ------------------------------------------------------------------ the device loop's side

    def runnable(self) -> list[Utterance]:
        """Utterances to step this tick: heads holding a slot whose client keeps up."""
        backlog = self.limits.max_buffered_packets
        live = []
        for s in self.sessions.values():
            head = s.utterances[0] if s.utterances else None
            if head is not None and head.handle is not None and len(s.out) < backlog:
                live.append(head)
        return live

    def first_packet_pending(self) -> bool:
        """Whether a stream that holds a slot waits for its first packet and can move (its
        text has started; a whole-text utterance only once its text has ended)."""
        for s in self.sessions.values():
            head = s.utterances[0] if s.utterances else None
            if (
                head is not None
                and head.handle is not None
                and head.first_packet_at is None
                and head.ids
                and (head.text_ended or not head.non_streaming_mode)
            ):
                return True
        return False

    def on_frame(self, u: Utterance, codes: np.ndarray) -> None:
        """A generated frame of ``u`` (its codes): held until ``to_decode`` lets it go."""
        u.pending_codes.append(codes)
        u.frames += 1
        u.frame_times.append(self.clock())

    def to_decode(self, finishing: Sequence[Utterance] = ()) -> list[tuple[Utterance, np.ndarray]]:
        """The utterances whose held frames leave now, each with those frames' codes
        [t, G]: the ones in ``finishing`` (generation ended: decode before
        ``on_finished``) and the ones their session's packet policy lets go. The caller
        decodes each and hands the audio to ``on_decoded``."""
        now = self.clock()
        ending = {id(u) for u in finishing}
        due, held = [], []
        for s in self.sessions.values():
            u = s.utterances[0] if s.utterances else None
            if u is None or not u.pending_codes or u.handle is None:
                continue
            text_waits = not u.text_ended and self.backend.consumed(u) >= len(u.ids)
            if text_waits:
                u.frame_times.clear()  # its pace restarts when text comes
            times = list(u.frame_times)
            interval = (
                statistics.median(b - a for a, b in itertools.pairwise(times)) if len(times) > 2 else None
            )
            if id(u) in ending or s.spec.packets.flush(
                len(u.pending_codes),
                first=u.first_packet_at is None,
                lead_s=(s.play_until - now) if s.play_until is not None else 0.0,
                frame_interval_s=interval,
                text_waits=text_waits,
            ):
                due.append((u, np.stack(u.pending_codes)))
            elif s.spec.packets.policy == "adaptive" and u.first_packet_at is not None:
                held.append(u)
        # An adaptive stream that holds as many frames as a packet leaving now goes with it:
        # the same decoder call (one batch per frame count), and sooner is never worse for
        # its listener. Fewer calls per tick when many streams hold different counts.
        sizes = {len(codes) for _, codes in due}
        due += [(u, np.stack(u.pending_codes)) for u in held if len(u.pending_codes) in sizes]
        return due

    def on_decoded(self, u: Utterance, pcm: np.ndarray) -> None:
        """The audio of every frame ``u`` held (from ``to_decode``): one packet."""
        s = self.sessions.get(u.sid)
        if s is not None:
            self._flush_packet(s, u, pcm)

    def _drop_held(self, s: SessionState, u: Utterance, reason: str) -> None:
        """A cancel drops the frames held back; an end of generation finds none (the
        device loop decodes them first: ``to_decode(finishing)``)."""
        if u.pending_codes and reason != "cancelled":
            log.error(
                "session %d utterance %d ended (%s) with %d frames not decoded: dropped",
                s.sid,
                u.uid,
                reason,
                len(u.pending_codes),
            )
        u.pending_codes = []

    def on_finished(self, u: Utterance, reason: str) -> None:
        """Generation of ``u`` ended: 'eos' or 'cap'."""
        s = self.sessions.get(u.sid)
        if s is not None and u.finish is None:
            self._guard(s, lambda: self._finish(s, u, reason))

    def _flush_packet(self, s: SessionState, u: Utterance, pcm: np.ndarray) -> None:
        n = len(u.pending_codes)
        assert n, "a packet of no frames"
        now = self.clock()
        tokens = self.backend.consumed(u) if u.handle is not None else 0
        chars = u.token_ends[tokens - 1] if tokens else 0
        s.out.put(
            PcmPacket(
                utterance_id=u.uid,
                key=u.key,
                seq=s.seq,
                sample_offset=u.samples,
                frame_start=u.pending_from,
                frame_end=u.pending_from + n,
                pcm=pcm,
                codes=np.stack(u.pending_codes),
                chars_consumed=chars,
                emitted_at=now,
                first_text_at=u.first_delta_at,
            )
        )
        if u.first_packet_at is None:
            u.first_packet_at = now
        s.play_until = max(now, s.play_until or now) + len(pcm) / self.sample_rate
        s.seq += 1
        u.samples += len(pcm)
        u.pending_from += n
        u.pending_codes = []
