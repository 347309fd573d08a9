"""The one catalogue of messages on the data channel (JSON objects with a ``type``).

Client -> agent: ``text`` (typed user text), ``interrupt`` (stop the agent now), ``ping``.
Agent -> client: ``ready``, ``vad``, ``turn``, ``transcript``, ``agent_text``,
``agent_done``, ``latency``, ``barge_in``, ``error``, ``pong``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar

from agent.errors import BadRequestError

# --------------------------------------------------------------------------- agent -> client


@dataclass(frozen=True)
class Outbound:
    type: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        d = {"type": self.type}
        d.update(dataclasses.asdict(self))
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))


@dataclass(frozen=True)
class Ready(Outbound):
    type: ClassVar[str] = "ready"
    mode: str  # "llm" | "say"
    asr: bool
    voice: str
    vad: dict[str, int]


@dataclass(frozen=True)
class VadState(Outbound):
    type: ClassVar[str] = "vad"
    state: str  # quiet | starting | speaking | stopping


@dataclass(frozen=True)
class TurnEvent(Outbound):
    """The user's turn (voice): ``start`` once speech is confirmed, ``end`` after the stop
    hysteresis. ``speech_ms``: voiced length of the turn (on ``end``)."""

    type: ClassVar[str] = "turn"
    event: str  # start | end
    turn: int
    speech_ms: float | None = None


@dataclass(frozen=True)
class Transcript(Outbound):
    type: ClassVar[str] = "transcript"
    turn: int
    text: str
    input: str  # voice | text


@dataclass(frozen=True)
class AgentText(Outbound):
    type: ClassVar[str] = "agent_text"
    turn: int
    delta: str


@dataclass(frozen=True)
class AgentDone(Outbound):
    """The agent's reply is over. ``text``: what the conversation history keeps (what was
    played, when ``interrupted``)."""

    type: ClassVar[str] = "agent_done"
    turn: int
    interrupted: bool
    text: str


@dataclass(frozen=True)
class Latency(Outbound):
    """Per-turn figures in milliseconds (``None``: not applicable to this turn).

    ``response_ms``: end of user speech (last voiced frame) or typed text received ->
    first agent audio frame sent. ``vad_stop_ms``: the part of it spent waiting for the
    stop hysteresis. ``asr_ms``: transcription. ``llm_first_token_ms``: LLM request ->
    first token. ``token_to_audio_ms``: first LLM token -> first audio frame sent."""

    type: ClassVar[str] = "latency"
    turn: int
    input: str
    response_ms: float
    vad_stop_ms: float | None
    asr_ms: float | None
    llm_first_token_ms: float | None
    token_to_audio_ms: float | None


@dataclass(frozen=True)
class BargeIn(Outbound):
    """The user interrupted the agent's reply ``turn``; sent once its audio has stopped.
    ``stop_ms``: barge-in decision -> first silent frame sent in place of its audio."""

    type: ClassVar[str] = "barge_in"
    turn: int
    stop_ms: float


@dataclass(frozen=True)
class Error(Outbound):
    type: ClassVar[str] = "error"
    message: str
    service: str | None = None


@dataclass(frozen=True)
class Pong(Outbound):
    type: ClassVar[str] = "pong"
    id: Any = None


# --------------------------------------------------------------------------- client -> agent


@dataclass(frozen=True)
class UserText:
    text: str


@dataclass(frozen=True)
class Interrupt:
    pass


@dataclass(frozen=True)
class Ping:
    id: Any = None


Inbound = UserText | Interrupt | Ping


def parse_inbound(raw: str | bytes, *, max_bytes: int, max_text_chars: int) -> Inbound:
    """One data-channel message from the client; ``BadRequestError`` says what is wrong."""
    if len(raw) > max_bytes:
        raise BadRequestError(f"message of {len(raw)} bytes; at most {max_bytes}")
    try:
        msg = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequestError(f"message is not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise BadRequestError("message must be a JSON object with a 'type'")
    kind = msg.get("type")
    if kind == "text":
        text = msg.get("text")
        if not isinstance(text, str):
            raise BadRequestError("'text' message needs a string 'text'")
        text = text.strip()
        if not text:
            raise BadRequestError("'text' is empty")
        if len(text) > max_text_chars:
            raise BadRequestError(f"'text' has {len(text)} characters; at most {max_text_chars}")
        return UserText(text)
    if kind == "interrupt":
        return Interrupt()
    if kind == "ping":
        return Ping(msg.get("id"))
    raise BadRequestError(f"unknown message type {kind!r}; expected text, interrupt or ping")
