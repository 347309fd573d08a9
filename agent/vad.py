"""Turn-taking: webrtcvad on 16 kHz mono frames, then a four-state machine with hysteresis.

    quiet --speech--> starting --speech for start_ms--> speaking --silence--> stopping
      ^                  |                                 ^                     |
      +----silence-------+                                 +------speech---------+
      ^                                                                          |
      +--------------------------silence for stop_ms----------------------------+

``SpeechStarted`` is the moment the user has the floor (barge-in decisions are made on it);
``SpeechEnded`` is the end of the user's turn and carries the turn's audio (with a
pre-roll from before the start decision) for the ASR. Timings count audio frames, so the
machine is deterministic; events are stamped by an injectable clock.
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
    at: float  # the decision (start hysteresis satisfied)
    began_at: float  # the first voiced frame of the run that confirmed it


@dataclass(frozen=True)
class SpeechEnded:
    at: float  # the decision (stop hysteresis satisfied, or the turn hit max_turn_s)
    last_speech_at: float  # the last voiced frame: the end of the user's speech
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

    def push(self, is_speech: bool) -> list[VadEvent]:
        """One frame's verdict; returns the events it caused, in order."""
        now = self.clock.now()
        events: list[VadEvent] = []
        if is_speech:
            self._last_speech_at = now
        s = self.state
        if s is State.QUIET:
            if is_speech:
                self._run, self._run_began_at = 1, now
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


class SpeechDetector:
    """16 kHz s16le mono bytes of any length in; VAD events out. Keeps the audio of the
    current turn (plus ``preroll_ms`` from before it) and hands it over with ``SpeechEnded``."""

    def __init__(self, config: VadConfig, clock: Clock | None = None) -> None:
        self.config = config.validated()
        self.turns = TurnDetector(config, clock)
        self._vad = webrtcvad.Vad(config.aggressiveness)
        self.frame_bytes = VAD_RATE * config.frame_ms // 1000 * 2
        self._buf = bytearray()
        self._preroll: deque[bytes] = deque(maxlen=config.preroll_ms // config.frame_ms)
        self._capture: list[bytes] | None = None

    @property
    def state(self) -> State:
        return self.turns.state

    def push(self, pcm: bytes) -> list[VadEvent]:
        self._buf.extend(pcm)
        events: list[VadEvent] = []
        n = self.frame_bytes
        while len(self._buf) >= n:
            frame = bytes(self._buf[:n])
            del self._buf[:n]
            events.extend(self._frame(frame))
        return events

    def _frame(self, frame: bytes) -> list[VadEvent]:
        before = self.turns.state
        events = self.turns.push(self._vad.is_speech(frame, VAD_RATE))
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
