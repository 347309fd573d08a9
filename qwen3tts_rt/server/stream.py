"""One engine session bound to one RPC, independent of the wire format.

The RPC's reader task calls ``text``/``flush``/``cancel``/``end`` (or ``fail``); its
writer iterates ``events()``, which turns engine messages into output-format audio
(resampled per utterance, encoded), progress and end-of-utterance events, and records
the latency metrics. Both the qwen3tts-rt API and the Riva API use it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from qwen3tts_rt import metrics
from qwen3tts_rt.audio import MODEL_SAMPLE_RATE, StreamResampler, encode_pcm
from qwen3tts_rt.engine.engine import Session
from qwen3tts_rt.engine.messages import PcmPacket, SessionClosed, SessionError, UtteranceDone
from qwen3tts_rt.server.errors import SessionFailedError
from qwen3tts_rt.server.runtime import OutputFormat

# C0 and C1 control characters other than tab, line feed and carriage return: invisible,
# never speech, and they would reach the model as byte tokens.
_CONTROL = {c: " " for c in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0))}


def clean_text(text: str) -> str:
    """Text as the model gets it: each control character (other than tab and line breaks)
    becomes a space, so that character offsets (``Progress.chars_consumed``) still count
    the client's characters."""
    return text.translate(_CONTROL)


def has_speech(text: str) -> bool:
    """Whether ``text`` holds anything to say (not only whitespace and control characters)."""
    return bool(clean_text(text).strip())


@dataclass(frozen=True)
class AudioEvent:
    utterance_id: int
    seq: int  # per stream, from 0
    sample_offset: int  # first sample within the utterance, at the output rate
    data: bytes  # encoded samples
    samples: int
    last: bool = False  # the utterance's final chunk (resampler tail; may be empty)


@dataclass(frozen=True)
class ProgressEvent:
    utterance_id: int
    chars_consumed: int


@dataclass(frozen=True)
class DoneEvent:
    done: UtteranceDone
    first_packet_latency_s: float | None  # measured by the server (first text in -> first audio out)


Event = AudioEvent | ProgressEvent | DoneEvent


@dataclass
class _Utt:
    resampler: StreamResampler
    first_text_at: float | None = None
    first_audio_at: float | None = None
    last_audio_at: float | None = None
    samples: int = 0
    chars: int = 0
    done: DoneEvent | None = None


class SpeechStream:
    def __init__(
        self, session: Session, fmt: OutputFormat, *, api: str, started_at: float | None = None
    ) -> None:
        self.session = session
        self.fmt = fmt
        self.api = api
        self.started_at = time.perf_counter() if started_at is None else started_at
        self._utts: dict[int, _Utt] = {}
        self._current = 0  # the utterance text goes to (the engine numbers them the same way)
        self._live_from = 0  # audio of utterances below this was cancelled: dropped
        self._seq = 0
        self._first_audio_written = False
        self._error: BaseException | None = None
        self._held = ""  # leading whitespace of the current utterance, not sent yet
        self._spoken = False  # the current utterance has text to say
        # more leading whitespace than an utterance may hold goes to the engine (which refuses it)
        self._max_held = session.engine.config.max_utterance_chars

    def _utt(self, uid: int) -> _Utt:
        u = self._utts.get(uid)
        if u is None:
            u = self._utts[uid] = _Utt(StreamResampler(MODEL_SAMPLE_RATE, self.fmt.sample_rate))
        return u

    # ------------------------------------------------------------------ reader side

    def text(self, delta: str) -> None:
        """A text delta of the current utterance. Control characters become spaces; the
        whitespace an utterance starts with is held back until something to say follows,
        so an utterance of whitespace only stays silent (as an empty one does)."""
        delta = clean_text(delta)
        if not self._spoken:
            self._held += delta
            if self._held.isspace() and len(self._held) <= self._max_held:
                return
            delta, self._held = self._held, ""
            self._spoken = bool(delta.strip())
        if delta:
            u = self._utt(self._current)
            if u.first_text_at is None:
                u.first_text_at = time.perf_counter()
            self.session.push_text(delta)

    def _next_utterance(self) -> None:
        self._current += 1
        self._held = ""
        self._spoken = False

    def flush(self, client_id: str = "") -> None:
        self.session.flush(client_id)
        self._next_utterance()

    def cancel(self) -> None:
        self.session.cancel()
        self._next_utterance()
        self._live_from = self._current

    def end(self) -> None:
        self.session.end_text()

    def fail(self, exc: BaseException) -> None:
        """End the stream with ``exc`` (raised from ``events``); frees the session."""
        if self._error is None:
            self._error = exc
        self.session.close()

    def close(self) -> None:
        """The RPC is over (done, cancelled, disconnected, deadline): free the session now."""
        self.session.close()

    # ------------------------------------------------------------------ writer side

    async def events(self) -> AsyncIterator[Event]:
        """Events until the session closes; raises the error that ended it, if any.
        Utterance ends come in utterance order."""
        out = self.session.out
        while True:
            msg = await out.aget()
            if self._error is not None:
                raise self._error
            if isinstance(msg, PcmPacket):
                if msg.utterance_id < self._live_from:
                    continue  # cancelled: never written
                u = self._utt(msg.utterance_id)
                pcm = u.resampler.push(msg.pcm)
                if pcm.size:
                    yield self._audio(msg.utterance_id, u, pcm)
                    now = time.perf_counter()
                    metrics.QUEUE_WAIT.labels(self.api).observe(max(now - msg.emitted_at, 0.0))
                    self._written(u, now, int(pcm.size))
                if msg.chars_consumed > u.chars:
                    u.chars = msg.chars_consumed
                    yield ProgressEvent(msg.utterance_id, msg.chars_consumed)
            elif isinstance(msg, UtteranceDone):
                u = self._utt(msg.utterance_id)
                if msg.reason != "cancelled":
                    tail = u.resampler.flush()
                    yield self._audio(msg.utterance_id, u, tail, last=True)
                    if tail.size:
                        self._written(u, time.perf_counter(), int(tail.size))
                u.done = self._done_event(msg, u)
                for ev in self._ready_dones():
                    yield ev
            elif isinstance(msg, SessionError):
                raise SessionFailedError(msg.message, kind=msg.kind)
            elif isinstance(msg, SessionClosed):
                for ev in self._ready_dones(final=True):
                    yield ev
                return

    def _ready_dones(self, final: bool = False) -> list[DoneEvent]:
        """Ends that may be sent: those with no earlier utterance still speaking."""
        ready = []
        for uid in sorted(self._utts):
            u = self._utts[uid]
            if u.done is None:
                if final:
                    continue
                break
            ready.append(u.done)
            del self._utts[uid]
        return ready

    def _done_event(self, msg: UtteranceDone, u: _Utt) -> DoneEvent:
        latency = msg.first_packet_latency_s
        if u.first_text_at is not None and u.first_audio_at is not None:
            latency = u.first_audio_at - u.first_text_at
        metrics.UTTERANCES.labels(self.api, msg.reason).inc()
        if msg.rtf is not None:
            metrics.REAL_TIME_FACTOR.labels(self.api).observe(msg.rtf)
        return DoneEvent(msg, latency)

    def _audio(self, uid: int, u: _Utt, pcm: np.ndarray, last: bool = False) -> AudioEvent:
        """An audio event; only one with samples takes a sequence number (an empty end
        marker is not written by the streaming API, and nothing follows it in Synthesize),
        so the numbers a client sees run 0, 1, 2, ... without gaps."""
        ev = AudioEvent(uid, self._seq, u.samples, encode_pcm(pcm, self.fmt.encoding), int(pcm.size), last)
        if pcm.size:
            self._seq += 1
        u.samples += int(pcm.size)
        return ev

    def _written(self, u: _Utt, now: float, samples: int) -> None:
        """Called once the writer has written an audio event (the generator resumed)."""
        if not self._first_audio_written:
            self._first_audio_written = True
            metrics.TIME_TO_FIRST_AUDIO.labels(self.api).observe(now - self.started_at)
        if u.first_audio_at is None:
            u.first_audio_at = now
            if u.first_text_at is not None:
                metrics.FIRST_PACKET_LATENCY.labels(self.api).observe(now - u.first_text_at)
        elif u.last_audio_at is not None:
            metrics.INTER_PACKET_GAP.labels(self.api).observe(now - u.last_audio_at)
        u.last_audio_at = now
        metrics.AUDIO_SECONDS.labels(self.api).inc(samples / self.fmt.sample_rate)
