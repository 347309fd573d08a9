"""The agent's voice on the call: TTS PCM (24 kHz) resampled to 48 kHz with PyAV and sent
as fixed 20 ms frames paced by their timestamps; silence when nothing is queued; the queue
is dropped at once on barge-in, so the next frame sent is silent.

The track keeps per-reply (``turn``) accounting: samples queued and sent, when the first
frame of a reply went out (latency), and an event once a finished reply has been sent in
full. What was sent is what the user heard (modulo the network), which is what the
conversation history keeps when a reply is interrupted.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from agent.clock import Clock, SystemClock

log = logging.getLogger(__name__)

OUT_RATE = 48000
FRAME_MS = 20
FRAME_SAMPLES = OUT_RATE * FRAME_MS // 1000  # 960
TIME_BASE = fractions.Fraction(1, OUT_RATE)
# Further behind schedule than this (a stalled process): the RTP time skips ahead to the
# wall clock instead of bursting the backlog; below it, late frames go out back to back.
MAX_LAG_S = 0.2


class Upsampler:
    """s16le mono bytes at ``in_rate`` -> int16 samples at 48 kHz (PyAV/libswresample).
    Stateful across pushes (no seams); one per reply."""

    def __init__(self, in_rate: int = 24000, out_rate: int = OUT_RATE) -> None:
        self.in_rate = in_rate
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=out_rate)
        self._pts = 0

    def _run(self, frame: av.AudioFrame | None) -> np.ndarray:
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return np.concatenate(out).astype(np.int16, copy=False) if out else np.zeros(0, np.int16)

    def push(self, pcm: bytes) -> np.ndarray:
        samples = np.frombuffer(pcm, dtype="<i2")
        if not samples.size:
            return np.zeros(0, np.int16)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.in_rate
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, self.in_rate)
        self._pts += samples.size
        return self._run(frame)

    def flush(self) -> np.ndarray:
        """The samples still inside the resampler (call once, at the end of the reply)."""
        return self._run(None)


@dataclass
class Playback:
    """One reply's audio on the track."""

    queued: int = 0  # samples pushed
    sent: int = 0  # samples sent in frames
    ended: bool = False  # no more samples will be pushed
    first_sent_at: float | None = None
    drained: asyncio.Event = field(default_factory=asyncio.Event)

    def _check_drained(self) -> None:
        if self.ended and self.sent >= self.queued:
            self.drained.set()


@dataclass(frozen=True)
class SentFrame:
    at: float
    audible: bool  # carried reply audio (not the silence filler)


class PacedAudioTrack(MediaStreamTrack):
    """Outbound audio: 20 ms s16 mono frames at 48 kHz; the frame of RTP time ``pts`` is
    released at ``start + pts / 48000``.

    RTP time stays on the wall clock: after a stall longer than ``MAX_LAG_S`` the next
    frame's ``pts`` skips ahead by the stalled time (whole frames) and ``start`` never moves.
    Delaying the timeline instead would leave every later packet "late" by the stall, and
    the receiver's jitter buffer would keep that much extra delay for the rest of the call.
    Only time is skipped: queued reply audio goes on from where it stopped."""

    kind = "audio"

    def __init__(
        self,
        clock: Clock | None = None,
        *,
        on_first_audio: Callable[[int, float], None] | None = None,
        on_stopped: Callable[[float, float], None] | None = None,
        frame_log: int = 3000,
    ) -> None:
        super().__init__()
        self.clock = clock or SystemClock()
        self.on_first_audio = on_first_audio  # (turn, sent_at): the first frame of a reply went out
        self.on_stopped = on_stopped  # (decided_at, stopped_at): first silent frame after a clear
        self._queue: deque[tuple[int, np.ndarray]] = deque()
        self._head = 0  # samples of the queue's first chunk already sent
        self._turns: dict[int, Playback] = {}
        self._start: float | None = None
        self._pts = 0
        self.skipped_samples = 0  # RTP time skipped after stalls (diagnostics, tests)
        self._stop_pending: float | None = None
        self.last_stop: tuple[float, float] | None = None  # (decided_at, stopped_at) of the last clear
        self.frames: deque[SentFrame] = deque(maxlen=frame_log)  # recent frames (diagnostics, tests)

    # ------------------------------------------------------------------ producer side

    def playback(self, turn: int) -> Playback:
        p = self._turns.get(turn)
        if p is None:
            p = self._turns[turn] = Playback()
        return p

    def push(self, turn: int, samples: np.ndarray) -> None:
        """Queue int16 48 kHz mono samples of reply ``turn``."""
        p = self.playback(turn)
        if p.ended or not samples.size:
            return
        self._queue.append((turn, samples.astype(np.int16, copy=False)))
        p.queued += int(samples.size)

    def end(self, turn: int) -> None:
        """No more audio for ``turn``: its ``drained`` event fires once all of it is sent."""
        p = self.playback(turn)
        p.ended = True
        p._check_drained()

    def sent_samples(self, turn: int) -> int:
        p = self._turns.get(turn)
        return p.sent if p else 0

    def forget(self, turn: int) -> None:
        self._turns.pop(turn, None)

    @property
    def queued_samples(self) -> int:
        return sum(s.size for _, s in self._queue) - self._head

    @property
    def audible(self) -> bool:
        """A reply is being heard: audio is queued, the last frame sent carried some, or a
        reply has started and not ended (its next audio is late: an underrun)."""
        return (
            bool(self._queue)
            or bool(self.frames and self.frames[-1].audible)
            or any(p.first_sent_at is not None and not p.ended for p in self._turns.values())
        )

    def clear(self, decided_at: float | None = None) -> int:
        """Barge-in: drop every queued sample now; the next frame sent is silent. Every reply
        on the track ends (its ``drained`` fires; later pushes are ignored). Returns the
        samples dropped.
        If audio was playing, ``on_stopped(decided_at, t)`` reports when silence went out."""
        dropped = self.queued_samples
        if self.audible:
            self._stop_pending = self.clock.now() if decided_at is None else decided_at
        for p in self._turns.values():  # every reply on the track ends here
            p.ended = True
            p.queued = p.sent
            p._check_drained()
        self._queue.clear()
        self._head = 0
        return dropped

    # ------------------------------------------------------------------ consumer side (aiortc)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        clock = self.clock
        if self._start is None:
            self._start = clock.now()
        due = self._start + self._pts / OUT_RATE
        await clock.sleep_until(due)
        now = clock.now()
        if now - due > MAX_LAG_S:
            # skip, don't delay: this frame takes the RTP time of the wall clock (whole frames)
            on_time = int((now - self._start) * OUT_RATE) // FRAME_SAMPLES * FRAME_SAMPLES
            log.debug("outbound audio %.0f ms behind schedule: RTP time skips ahead", (now - due) * 1000)
            self.skipped_samples += on_time - self._pts
            self._pts = on_time
        # Samples are taken after the wait, so a clear() during it silences this frame.
        data = np.zeros(FRAME_SAMPLES, np.int16)
        filled = 0
        touched: list[int] = []
        while filled < FRAME_SAMPLES and self._queue:
            turn, chunk = self._queue[0]
            take = min(FRAME_SAMPLES - filled, chunk.size - self._head)
            data[filled : filled + take] = chunk[self._head : self._head + take]
            filled += take
            self._head += take
            self._turns[turn].sent += take
            if not touched or touched[-1] != turn:
                touched.append(turn)
            if self._head >= chunk.size:
                self._queue.popleft()
                self._head = 0
        sent_at = clock.now()
        for turn in touched:
            p = self._turns[turn]
            if p.first_sent_at is None:
                p.first_sent_at = sent_at
                if self.on_first_audio is not None:
                    self.on_first_audio(turn, sent_at)
            p._check_drained()
        if self._stop_pending is not None and filled < FRAME_SAMPLES:
            decided_at, self._stop_pending = self._stop_pending, None
            self.last_stop = (decided_at, sent_at)
            if self.on_stopped is not None:
                self.on_stopped(decided_at, sent_at)
        self.frames.append(SentFrame(sent_at, filled > 0))
        frame = av.AudioFrame.from_ndarray(data.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = OUT_RATE
        frame.pts = self._pts
        frame.time_base = TIME_BASE
        self._pts += FRAME_SAMPLES
        return frame
