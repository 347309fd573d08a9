"""The one domain-error hierarchy of qwen3tts-rt.

Every error a user can cause or meet is one of these classes. The gRPC layer maps
them to status codes in exactly one place (``qwen3tts_rt.server.errors``); nothing
below the server knows about gRPC.

* ``InvalidInputError`` and its subclasses  -> INVALID_ARGUMENT
* ``CapacityError``                         -> RESOURCE_EXHAUSTED
* ``NotFoundError``                         -> NOT_FOUND
* ``UnavailableError``                      -> UNAVAILABLE
* ``ModelUnavailableError``/``CheckpointError`` -> FAILED_PRECONDITION at start-up
"""

from __future__ import annotations


class Qwen3TTSError(Exception):
    """Base of every error raised on purpose by qwen3tts-rt."""


# --------------------------------------------------------------------------- model files


class CheckpointError(Qwen3TTSError):
    """A checkpoint directory is missing files or holds inconsistent ones."""


class ModelUnavailableError(Qwen3TTSError):
    """The model could not be found locally and could not be downloaded."""


# --------------------------------------------------------------------------- bad input


class InvalidInputError(Qwen3TTSError):
    """The caller sent something that breaks a stated rule.

    ``field`` names the request field (or argument) at fault, so that the message
    given to a client always says which input broke which rule.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{self.field}: {msg}" if self.field else msg


class UnknownSpeakerError(InvalidInputError):
    pass


class UnknownLanguageError(InvalidInputError):
    pass


class UnknownVoiceError(InvalidInputError):
    pass


class UnsupportedOperationError(InvalidInputError):
    """The request asks the loaded checkpoint for something its kind cannot do
    (e.g. a built-in speaker on a Base checkpoint)."""


class InvalidSamplingError(InvalidInputError):
    pass


class TextTooLongError(InvalidInputError):
    pass


class ReferenceAudioError(InvalidInputError):
    """Reference audio for voice cloning broke one of the rules of
    ``qwen3tts_rt.audio.ReferenceAudioRules``."""

    def __init__(self, message: str, *, field: str | None = "ref_audio") -> None:
        super().__init__(message, field=field)


class AudioEmptyError(ReferenceAudioError):
    pass


class AudioTooLargeError(ReferenceAudioError):
    pass


class AudioUndecodableError(ReferenceAudioError):
    pass


class AudioTooLongError(ReferenceAudioError):
    pass


class AudioTooShortError(ReferenceAudioError):
    pass


class AudioSampleRateError(ReferenceAudioError):
    pass


class AudioNonFiniteError(ReferenceAudioError):
    pass


class AudioSilentError(ReferenceAudioError):
    pass


class MissingReferenceTextError(ReferenceAudioError):
    def __init__(self, message: str, *, field: str | None = "ref_text") -> None:
        super().__init__(message, field=field)


# --------------------------------------------------------------------------- capacity


class CapacityError(Qwen3TTSError):
    """The server is at a configured limit (sessions, queue)."""


class NotFoundError(Qwen3TTSError):
    pass


class TimeLimitError(Qwen3TTSError):
    """A stream passed a time limit (idle too long, or open too long): DEADLINE_EXCEEDED."""


class UnavailableError(Qwen3TTSError):
    """The call cannot be taken now: the model is still loading, the server is draining,
    or the engine has stopped (UNAVAILABLE: retry, elsewhere if need be)."""


ECHO_MAX_CHARS = 64  # of a client's value quoted in a message


def echo(value: object, limit: int = ECHO_MAX_CHARS) -> str:
    """A client's value for an error message: quoted with escapes (``repr``), cut to
    ``limit`` characters with its full length when longer."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"
