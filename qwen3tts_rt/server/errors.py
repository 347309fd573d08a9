"""The one place where domain errors become gRPC status codes.

* ``InvalidInputError`` (and subclasses)      -> INVALID_ARGUMENT (message names field and rule)
* ``CapacityError``                           -> RESOURCE_EXHAUSTED
* ``NotFoundError``                           -> NOT_FOUND
* ``TimeLimitError`` (stream idle / too long)  -> DEADLINE_EXCEEDED
* ``UnavailableError`` (not ready, draining)  -> UNAVAILABLE
* ``ModelUnavailableError``/``CheckpointError`` -> FAILED_PRECONDITION
* a failure inside an engine session          -> by ``SessionError.kind``
* a request message that does not parse       -> INVALID_ARGUMENT (``DecodeError``: bad UTF-8
  in a string field, corrupt wire format). Streamed requests are parsed as the handler reads
  them; single requests are parsed before any handler runs, so ``UndecodableRequestInterceptor``
  hands those over as ``UndecodableRequest`` (else gRPC would answer UNKNOWN).
* anything else                               -> INTERNAL (details only in the server log)

Every message is bounded (``bounded``): a value echoed from a request (a 20 kB language,
a 1 MB id) must not push the status over gRPC's metadata limit, where the client would see
RESOURCE_EXHAUSTED instead of the real code. Where a message is built, ``echo`` quotes a
client's value cut to a few dozen characters.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from qwen3tts_rt.errors import (
    CapacityError,
    CheckpointError,
    InvalidInputError,
    ModelUnavailableError,
    NotFoundError,
    Qwen3TTSError,
    TimeLimitError,
    UnavailableError,
    echo,  # noqa: F401 - re-exported: messages built in the server quote client values with it
)

log = logging.getLogger(__name__)


class SessionFailedError(Qwen3TTSError):
    """An engine session ended with a ``SessionError``; ``kind`` picks the status code."""

    def __init__(self, message: str, *, kind: str = "internal") -> None:
        super().__init__(message)
        self.kind = kind


_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (TimeLimitError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (ModelUnavailableError, grpc.StatusCode.FAILED_PRECONDITION),
    (CheckpointError, grpc.StatusCode.FAILED_PRECONDITION),
)

_SESSION_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "capacity": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "internal": grpc.StatusCode.INTERNAL,
}


MAX_STATUS_MESSAGE_BYTES = 1024  # UTF-8 bytes of a status message (sent percent-encoded in a header)


def bounded(message: str, limit: int = MAX_STATUS_MESSAGE_BYTES) -> str:
    """``message`` cut to at most ``limit`` UTF-8 bytes, keeping its start (the field at
    fault) and its end (what is allowed) and saying how much was cut from the middle."""
    data = message.encode("utf-8", "replace")
    if len(data) <= limit:
        return message
    keep = limit - 48  # room for the marker
    head = data[: keep * 2 // 3].decode("utf-8", "ignore")
    tail = data[len(data) - (keep - keep * 2 // 3) :].decode("utf-8", "ignore")
    cut = len(message) - len(head) - len(tail)
    return f"{head} ...[{cut} characters cut]... {tail}"


def undecodable_message(exc: BaseException) -> str:
    return (
        f"request: the message could not be parsed ({exc}); send a valid protobuf message (strings in UTF-8)"
    )


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(status code, client-facing message) for an exception; the message is ``bounded``."""
    code, message = _status_for(exc)
    return code, bounded(message)


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, SessionFailedError):
        return _SESSION_CODES.get(exc.kind, grpc.StatusCode.INTERNAL), str(exc)
    if isinstance(exc, DecodeError):
        return grpc.StatusCode.INVALID_ARGUMENT, undecodable_message(exc)
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


def with_field_prefix(exc: InvalidInputError, prefix: str) -> InvalidInputError:
    """Qualify the field an error names with where it sits in the request
    (``temperature`` -> ``config.sampling.temperature``)."""
    if exc.field and not exc.field.startswith(prefix):
        exc.field = f"{prefix}{exc.field}"
    elif not exc.field:
        exc.field = prefix.rstrip(".")
    return exc


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("internal error in an RPC", exc_info=exc)
    await context.abort(code, message)
    raise AssertionError("unreachable")  # context.abort raises


def grpc_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an async servicer method (coroutine or async generator): domain errors
    raised inside it end the RPC with their status code; any other exception ends it
    with INTERNAL (logged with its traceback). Cancellation passes through, and so does a
    failure of the call in gRPC's core (the client is gone: ``ClientGoneInterceptor`` ends
    the call as cancelled)."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def gen_wrapper(
            self: Any, request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except (grpc.aio.AbortError, grpc.aio.InternalError):  # aborted; or the call is gone
                raise
            except Exception as e:
                await abort(context, e)

        return gen_wrapper

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except (grpc.aio.AbortError, grpc.aio.InternalError):  # aborted; or the call is gone
            raise
        except Exception as e:
            await abort(context, e)

    return wrapper
