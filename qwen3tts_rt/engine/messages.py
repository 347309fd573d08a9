"""The one catalogue of messages that leave the engine. The gRPC servicers and the
CLIs translate these; nothing else defines output message types."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class PcmPacket:
    utterance_id: int
    seq: int  # packet number within the session, from 0
    sample_offset: int  # first sample of this packet within the utterance (24 kHz)
    frame_start: int  # codec frames [frame_start, frame_end) of the utterance
    frame_end: int
    pcm: np.ndarray  # float32 mono at the codec rate
    codes: np.ndarray  # [frame_end - frame_start, G] int64 codec frames of this packet
    chars_consumed: int  # characters of the utterance's text the talker has read (not yet heard)
    emitted_at: float  # time.perf_counter() when the worker emitted it
    key: str = ""  # the utterance's client key
    first_text_at: float | None = None  # perf_counter() of the utterance's first text to speak


@dataclass(frozen=True)
class UtteranceDone:
    utterance_id: int
    reason: str  # "eos" | "cap" | "cancelled"  (exactly one per utterance, in utterance order)
    frames: int
    audio_seconds: float
    first_packet_latency_s: float | None  # first text delta of the utterance -> first packet
    rtf: float | None  # compute time / audio time
    client_id: str = ""
    key: str = ""  # the utterance's client key
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SessionError:
    """A failure confined to one session (its stream ends with this)."""

    message: str
    kind: str = "internal"  # "internal" | "invalid" | "capacity"


@dataclass(frozen=True)
class SessionClosed:
    pass


EngineMessage = PcmPacket | UtteranceDone | SessionError | SessionClosed
