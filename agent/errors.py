"""The agent's domain errors. They become HTTP statuses in ``agent.app`` and ``error``
messages on the data channel in ``agent.peer``; nowhere else."""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class BadRequestError(AgentError):
    """A client sent something malformed (an offer, a data-channel message)."""


class OverloadedError(AgentError):
    """Too many peer connections."""


class UpstreamError(AgentError):
    """A service the agent calls failed: the TTS server, the LLM or the ASR endpoint."""

    service = "upstream"


class LLMError(UpstreamError):
    service = "llm"


class ASRError(UpstreamError):
    service = "asr"


class TTSError(UpstreamError):
    service = "tts"
