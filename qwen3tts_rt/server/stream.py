"""One engine session bound to one RPC, independent of the wire format.

The RPC's reader task calls ``text``/``begin``/``flush``/``cancel``/``end`` (or
``fail``); its writer iterates ``events()``, which turns engine messages into
output-format audio (resampled per utterance, encoded), progress and end-of-utterance
events, and records the latency metrics. Both the qwen3tts-rt API and the Riva API use
it. Text rules (cleaning, silence) and utterance identity and order live in the engine.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from qwen3tts_rt import metrics
from qwen3tts_rt.audio import MODEL_SAMPLE_RATE, StreamResampler, encode_pcm
from qwen3tts_rt.engine.engine import Session, UtteranceOptions
from qwen3tts_rt.engine.messages import PcmPacket, SessionClosed, SessionError, UtteranceDone
from qwen3tts_rt.server.errors import SessionFailedError
from qwen3tts_rt.server.runtime import OutputFormat


@dataclass(frozen=True)
class AudioEvent:
    utterance_id: int
    key: str
    seq: int  # per stream, from 0
    sample_offset: int  # first sample within the utterance, at the output rate
    data: bytes  # encoded samples
    samples: int
    last: bool = False  # the utterance's final chunk (resampler tail; may be empty)


@dataclass(frozen=True)
class ProgressEvent:
    utterance_id: int
    key: str
    chars_consumed: int  # read by the talker (not yet heard) ...
    sample_offset: int  # ... when the audio up to here (output rate) had been generated


@dataclass(frozen=True)
class DoneEvent:
    done: UtteranceDone
    first_packet_latency_s: float | None  # first text in -> first audio written, by the server


Event = AudioEvent | ProgressEvent | DoneEvent


@dataclass
class _Utt:
    resampler: StreamResampler
    first_audio_at: float | None = None
    last_audio_at: float | None = None
    first_text_at: float | None = None
    samples: int = 0
    chars: int = 0


class SpeechStream:
    def __init__(
        self, session: Session, fmt: OutputFormat, *, api: str, started_at: float | None = None
    ) -> None:
        self.session = session
        self.fmt = fmt
        self.api = api
        self.started_at = time.perf_counter() if started_at is None else started_at
        self._utts: dict[int, _Utt] = {}
        # audio emitted before a cancel reached this stream is dropped here too (the engine
        # drops what it still holds once it applies the cancel): all of it, or one key's
        self._cancel_all_at = 0.0
        self._cancel_key_at: dict[str, float] = {}
        self._seq = 0
        self._first_audio_written = False
        self._error: BaseException | None = None

    def _new_utt(self) -> _Utt:
        return _Utt(StreamResampler(MODEL_SAMPLE_RATE, self.fmt.sample_rate))

    def _utt(self, uid: int) -> _Utt:
        u = self._utts.get(uid)
        if u is None:
            u = self._utts[uid] = self._new_utt()
        return u

    # ------------------------------------------------------------------ reader side

    def text(self, delta: str) -> None:
        """A text delta of the current utterance (raw: the engine applies the text rules)."""
        if delta:
            self.session.push_text(delta)

    def begin(self, key: str = "", options: UtteranceOptions | None = None) -> None:
        self.session.begin(key, options)

    def flush(self, client_id: str = "") -> None:
        self.session.flush(client_id)

    def cancel(self, key: str | None = None) -> None:
        now = time.perf_counter()
        if key is None:
            self._cancel_all_at = now
        else:
            self._cancel_key_at[key] = now
        self.session.cancel(key)

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

    @property
    def speaking(self) -> bool:
        """Whether the engine still has audio of this stream to deliver (for idle rules)."""
        return bool(self._utts) or len(self.session.out) > 0

    # ------------------------------------------------------------------ writer side

    def _cancelled(self, msg: PcmPacket) -> bool:
        if msg.emitted_at < self._cancel_all_at:
            return True
        at = self._cancel_key_at.get(msg.key)
        return at is not None and msg.emitted_at < at

    async def events(self) -> AsyncIterator[Event]:
        """Events until the session closes; raises the error that ended it, if any.
        Utterance ends come in utterance order (the engine's guarantee)."""
        out = self.session.out
        while True:
            msg = await out.aget()
            if self._error is not None:
                raise self._error
            if isinstance(msg, PcmPacket):
                if self._cancelled(msg):
                    continue  # cancelled: never written
                u = self._utt(msg.utterance_id)
                if u.first_text_at is None:
                    u.first_text_at = msg.first_text_at
                metrics.PACKET_FRAMES.labels(self.api).observe(msg.frame_end - msg.frame_start)
                pcm = u.resampler.push(msg.pcm)
                if pcm.size:
                    yield self._audio(msg, u, pcm)
                    now = time.perf_counter()
                    metrics.QUEUE_WAIT.labels(self.api).observe(max(now - msg.emitted_at, 0.0))
                    self._written(u, now, int(pcm.size))
                if msg.chars_consumed > u.chars:
                    u.chars = msg.chars_consumed
                    yield ProgressEvent(msg.utterance_id, msg.key, msg.chars_consumed, u.samples)
            elif isinstance(msg, UtteranceDone):
                u = self._utts.pop(msg.utterance_id) if msg.utterance_id in self._utts else self._new_utt()
                if msg.reason != "cancelled":
                    tail = u.resampler.flush()
                    yield self._audio(msg, u, tail, last=True)
                    if tail.size:
                        self._written(u, time.perf_counter(), int(tail.size))
                yield self._done_event(msg, u)
            elif isinstance(msg, SessionError):
                raise SessionFailedError(msg.message, kind=msg.kind)
            elif isinstance(msg, SessionClosed):
                return

    def _done_event(self, msg: UtteranceDone, u: _Utt) -> DoneEvent:
        latency = msg.first_packet_latency_s
        if u.first_text_at is not None and u.first_audio_at is not None:
            latency = u.first_audio_at - u.first_text_at
        metrics.UTTERANCES.labels(self.api, msg.reason).inc()
        if msg.rtf is not None:
            metrics.REAL_TIME_FACTOR.labels(self.api).observe(msg.rtf)
        return DoneEvent(msg, latency)

    def _audio(
        self, msg: PcmPacket | UtteranceDone, u: _Utt, pcm: np.ndarray, last: bool = False
    ) -> AudioEvent:
        """An audio event; only one with samples takes a sequence number (an empty end
        marker is not written by the streaming API, and nothing follows it in Synthesize),
        so the numbers a client sees run 0, 1, 2, ... without gaps."""
        data = encode_pcm(pcm, self.fmt.encoding)
        ev = AudioEvent(msg.utterance_id, msg.key, self._seq, u.samples, data, int(pcm.size), last)
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
