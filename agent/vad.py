"""Turn-taking: webrtcvad on 16 kHz mono frames, then a four-state machine with hysteresis.

    quiet --speech--> starting --speech for start_ms--> speaking --silence--> stopping
      ^                  |                                 ^                     |
      +----silence-------+                                 +------speech---------+
      ^                                                                          |
      +--------------------------silence for stop_ms----------------------------+

``SpeechStarted`` is the moment the user has the floor (barge-in decisions are made on it);
``SpeechEnded`` is the end of the user's turn and carries the turn's audio (with a
pre-roll from before the start decision) for the ASR. Timings count audio frames, so the
machine is deterministic. Decisions are stamped by an injectable clock when they are made;
the speech itself (``last_speech_at``, ``began_at``) is stamped at the audio's own time: the
frame's media time (RTP timestamps -> pts, or a sample count) put on that clock by an
``AudioTimeline``, so audio that waited in a queue or came in a burst after a stall is
stamped when it arrived, not when it was processed.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, field

import av
import numpy as np
import webrtcvad

from agent.clock import Clock, SystemClock
from agent.config import VadConfig

VAD_RATE = 16000
# The audio timeline's offset may rise by this much per second: a sender whose sample clock
# runs slower than ours (audio clocks differ by up to ~100 ppm) does not leave it behind.
TIMELINE_DRIFT = 0.001
# Media time further than this from the count of samples received (lost packets, a new
# stream) restarts the count there.
RESYNC_S = 0.005


class State(enum.Enum):
    QUIET = "quiet"
    STARTING = "starting"
    SPEAKING = "speaking"
    STOPPING = "stopping"


@dataclass(frozen=True)
class StateChanged:
    state: State
    at: float


@dataclass(frozen=True)
class SpeechStarted:
    at: float  # the decision (start hysteresis satisfied), on the clock
    began_at: float  # the end of the first voiced frame of the run that confirmed it (audio time)


@dataclass(frozen=True)
class SpeechEnded:
    at: float  # the decision (stop hysteresis satisfied, or the turn hit max_turn_s), on the clock
    last_speech_at: float  # the end of the last voiced frame: the end of the user's speech (audio time)
    speech_s: float  # voiced audio in the turn
    truncated: bool = False  # ended by max_turn_s, not by silence
    audio: bytes = field(default=b"", repr=False)  # 16 kHz s16le mono: pre-roll + the turn


VadEvent = StateChanged | SpeechStarted | SpeechEnded


class TurnDetector:
    """The four-state machine over per-frame speech flags. Pure: no audio, no I/O."""

    def __init__(self, config: VadConfig, clock: Clock | None = None) -> None:
        self.config = config.validated()
        self.clock = clock or SystemClock()
        f = config.frame_ms
        self.start_frames = max(1, math.ceil(config.start_ms / f))
        self.stop_frames = max(1, math.ceil(config.stop_ms / f))
        self.max_turn_frames = max(1, math.ceil(config.max_turn_s * 1000 / f))
        self.state = State.QUIET
        self._run = 0  # consecutive frames confirming the pending transition
        self._run_began_at = 0.0
        self._turn_frames = 0  # frames since SpeechStarted
        self._voiced_frames = 0
        self._last_speech_at = 0.0

    def reset(self) -> None:
        self.state = State.QUIET
        self._run = 0
        self._turn_frames = 0
        self._voiced_frames = 0

    def push(self, is_speech: bool, audio_at: float | None = None) -> list[VadEvent]:
        """One frame's verdict; returns the events it caused, in order. ``audio_at``: when
        the frame's audio ended, on the clock (default: now, the frame is live)."""
        now = self.clock.now()
        heard = now if audio_at is None else audio_at
        events: list[VadEvent] = []
        if is_speech:
            self._last_speech_at = heard
        s = self.state
        if s is State.QUIET:
            if is_speech:
                self._run, self._run_began_at = 1, heard
                self._go(State.STARTING, now, events)
                if self._run >= self.start_frames:
                    self._start(now, events)
        elif s is State.STARTING:
            if is_speech:
                self._run += 1
                if self._run >= self.start_frames:
                    self._start(now, events)
            else:
                self._run = 0
                self._go(State.QUIET, now, events)  # a false start: too short to count
        else:  # SPEAKING or STOPPING: the user has the floor
            self._turn_frames += 1
            if is_speech:
                self._voiced_frames += 1
            if s is State.SPEAKING and not is_speech:
                self._run = 1
                self._go(State.STOPPING, now, events)
            elif s is State.STOPPING:
                if is_speech:
                    self._go(State.SPEAKING, now, events)
                else:
                    self._run += 1
            if self.state is State.STOPPING and self._run >= self.stop_frames:
                self._end(now, events, truncated=False)
            elif self._turn_frames >= self.max_turn_frames:
                self._end(now, events, truncated=True)
        return events

    def _go(self, state: State, now: float, events: list[VadEvent]) -> None:
        self.state = state
        events.append(StateChanged(state, now))

    def _start(self, now: float, events: list[VadEvent]) -> None:
        self._turn_frames = self._run
        self._voiced_frames = self._run
        self._run = 0
        self._go(State.SPEAKING, now, events)
        events.append(SpeechStarted(at=now, began_at=self._run_began_at))

    def _end(self, now: float, events: list[VadEvent], *, truncated: bool) -> None:
        speech_s = self._voiced_frames * self.config.frame_ms / 1000.0
        self._run = 0
        self._turn_frames = 0
        self._go(State.QUIET, now, events)
        events.append(SpeechEnded(now, self._last_speech_at, speech_s, truncated))


class AudioTimeline:
    """The received audio's own time, on the local clock.

    Audio carries its media time (seconds; from RTP timestamps, or a running sample count).
    The audio of media time ``m`` is placed at ``m + offset``, ``offset`` being the smallest
    ``received_at - media time`` seen: the least-delayed delivery of the call. Audio that
    waits in a queue, or arrives in a burst after a stall, then keeps the time it was sent
    at. The offset relaxes by ``drift`` per second (clock drift); media time going backwards
    (a new stream) starts it over."""

    def __init__(self, drift: float = TIMELINE_DRIFT) -> None:
        if not 0.0 <= drift < 0.1:
            raise ValueError(f"drift must be in [0, 0.1) s per s, got {drift}")
        self.drift = drift
        self.offset: float | None = None
        self._media = 0.0
        self._seen_at = 0.0

    def observe(self, media_end: float, received_at: float) -> None:
        """Audio up to media time ``media_end`` had arrived at ``received_at``."""
        lag = received_at - media_end
        if self.offset is None or media_end < self._media:
            self.offset = lag
        else:
            relaxed = self.offset + self.drift * max(0.0, received_at - self._seen_at)
            self.offset = min(relaxed, lag)
        self._media, self._seen_at = media_end, received_at

    def at(self, media: float) -> float:
        """Media time -> the clock (``observe`` first)."""
        if self.offset is None:
            raise RuntimeError("AudioTimeline.at() before any audio was observed")
        return media + self.offset


class SpeechDetector:
    """16 kHz s16le mono bytes of any length in; VAD events out. Keeps the audio of the
    current turn (plus ``preroll_ms`` from before it) and hands it over with ``SpeechEnded``.
    Speech is stamped at the audio's own time (see ``AudioTimeline``)."""

    def __init__(self, config: VadConfig, clock: Clock | None = None) -> None:
        self.config = config.validated()
        self.turns = TurnDetector(config, clock)
        self.clock = self.turns.clock
        self.timeline = AudioTimeline()
        self._media_end: float | None = None  # media time of the end of the audio pushed
        self._vad = webrtcvad.Vad(config.aggressiveness)
        self.frame_bytes = VAD_RATE * config.frame_ms // 1000 * 2
        self._buf = bytearray()
        self._preroll: deque[bytes] = deque(maxlen=config.preroll_ms // config.frame_ms)
        self._capture: list[bytes] | None = None

    @property
    def state(self) -> State:
        return self.turns.state

    def push(
        self, pcm: bytes, media_time: float | None = None, received_at: float | None = None
    ) -> list[VadEvent]:
        """``pcm``: 16 kHz s16le mono. ``media_time``: the audio time (s) of its first sample,
        from the frame's pts (None: it follows the audio pushed before). ``received_at``: when
        it arrived, on the clock (None: now)."""
        if len(pcm) % 2:
            raise ValueError(f"s16le audio has an even number of bytes, got {len(pcm)}")
        end = self._media_end
        if end is None or (media_time is not None and abs(media_time - end) > RESYNC_S):
            end = 0.0 if media_time is None else media_time
        end += len(pcm) / 2 / VAD_RATE
        self._media_end = end
        self.timeline.observe(end, self.clock.now() if received_at is None else received_at)
        self._buf.extend(pcm)
        events: list[VadEvent] = []
        n = self.frame_bytes
        while len(self._buf) >= n:
            frame = bytes(self._buf[:n])
            del self._buf[:n]
            frame_end = end - len(self._buf) / 2 / VAD_RATE
            events.extend(self._frame(frame, self.timeline.at(frame_end)))
        return events

    def _frame(self, frame: bytes, audio_at: float) -> list[VadEvent]:
        before = self.turns.state
        events = self.turns.push(self._vad.is_speech(frame, VAD_RATE), audio_at)
        if before is State.QUIET and self._capture is None and self.turns.state is not State.QUIET:
            self._capture = list(self._preroll)
        if self._capture is not None:
            self._capture.append(frame)
        self._preroll.append(frame)
        out: list[VadEvent] = []
        for ev in events:
            if isinstance(ev, SpeechEnded):
                audio = b"".join(self._capture or [])
                self._capture = None
                ev = SpeechEnded(ev.at, ev.last_speech_at, ev.speech_s, ev.truncated, audio)
            elif isinstance(ev, StateChanged) and ev.state is State.QUIET and before is State.STARTING:
                self._capture = None  # a false start: nothing to keep
            out.append(ev)
        return out


class To16kMono:
    """Any ``av.AudioFrame`` (aiortc hands over 48 kHz s16) -> 16 kHz s16le mono bytes."""

    def __init__(self) -> None:
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=VAD_RATE)

    def convert(self, frame: av.AudioFrame) -> bytes:
        out = [f.to_ndarray().reshape(-1).astype("<i2", copy=False) for f in self._resampler.resample(frame)]
        return np.concatenate(out).tobytes() if out else b""
