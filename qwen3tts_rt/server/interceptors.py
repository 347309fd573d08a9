"""Server interceptors: bearer-token auth (checked before a request body is parsed), a
separate bound for calls that need no credentials, clients that disconnect, per-RPC status
counting, RPCs in flight, and requests that do not parse.

The server installs them in this order (the first wraps all the others):
``MetricsInterceptor``, ``ClientGoneInterceptor``, ``UnauthenticatedLimitInterceptor``,
``BearerAuthInterceptor`` (when a token is set), ``UndecodableRequestInterceptor``,
``InFlightInterceptor``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from qwen3tts_rt import metrics
from qwen3tts_rt.server.errors import undecodable_message

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
HEALTH_WATCH = HEALTH_PREFIX + "Watch"


# The generator wrappers below close the generator they iterate (``aclosing``) when they are
# closed themselves, so that closing the outermost one (``ClientGoneInterceptor``) runs the
# servicer's cleanup at once rather than whenever the garbage collector finalises it.


def _wrap(
    handler: grpc.RpcMethodHandler,
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A copy of ``handler`` whose behaviour is ``wrap(behaviour)`` (same RPC kind), with
    another request deserializer where one is given."""
    kw = dict(
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), **kw)
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), **kw)


def _around(
    behaviour: Callable[..., Any], before: Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]
) -> Callable[..., Any]:
    """``behaviour`` (coroutine or async generator) preceded by ``await before(request, context)``."""
    if inspect.isasyncgenfunction(behaviour):

        async def gen(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await before(request, context)
            async with contextlib.aclosing(behaviour(request, context)) as items:
                async for item in items:
                    yield item

        return gen

    async def coro(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await before(request, context)
        return await behaviour(request, context)

    return coro


def bearer_matches(value: str | bytes | None, token: str) -> bool:
    """Whether an ``authorization`` value is ``Bearer <token>``: the scheme in any case
    (RFC 7235), one or more spaces, then exactly the token (compared in constant time)."""
    if value is None:
        return False
    raw = value.encode("utf-8", "replace") if isinstance(value, str) else bytes(value)
    scheme, sep, credentials = raw.partition(b" ")
    if not sep or scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(credentials.lstrip(b" "), token.encode())


UNAUTHENTICATED_MESSAGE = "missing or wrong credentials: send metadata 'authorization: Bearer <token>'"


async def _deny(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler for ``handler``'s method that answers UNAUTHENTICATED without reading,
    let alone parsing, the request: it takes the request as a stream (so gRPC does not
    receive a single request before calling it) and never reads that stream."""
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_deny, response_serializer=handler.response_serializer)
    return grpc.stream_unary_rpc_method_handler(_deny, response_serializer=handler.response_serializer)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC except health checks needs ``authorization: Bearer <token>`` metadata
    (``bearer_matches``); otherwise UNAUTHENTICATED, decided from the method name and the
    metadata alone, before any request body is read or parsed."""

    def __init__(self, token: str) -> None:
        self._token = token

    def _ok(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key.lower() == "authorization":
                return bearer_matches(value, self._token)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if (
            handler is None
            or method.startswith(HEALTH_PREFIX)
            or self._ok(handler_call_details.invocation_metadata)
        ):
            return handler
        return _denied(handler)


class UnauthenticatedLimitInterceptor(grpc.aio.ServerInterceptor):
    """Calls that need no credentials (health Check and Watch) get their own small bound,
    so that they can never use up ``max_concurrent_rpcs``, which authenticated traffic
    needs: at most ``max_calls`` of them in flight, of which at most ``max_watches`` Watch
    streams (a watch never ends on its own). More get RESOURCE_EXHAUSTED at once."""

    def __init__(self, max_calls: int, max_watches: int) -> None:
        self.max_calls = max_calls
        self.max_watches = max_watches
        self.calls = 0
        self.watches = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(HEALTH_PREFIX):
            return handler
        watch = method == HEALTH_WATCH
        return _wrap(
            handler, lambda b: _admitted(b, lambda ctx: self._enter(ctx, watch), lambda: self._exit(watch))
        )

    async def _enter(self, context: grpc.aio.ServicerContext, watch: bool) -> None:
        if self.calls >= self.max_calls:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many health calls in flight (max_unauthenticated_rpcs={self.max_calls}); retry later",
            )
        if watch and self.watches >= self.max_watches:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many health Watch streams (max_health_watches={self.max_watches}); "
                f"use Check, or retry later",
            )
        self.calls += 1
        self.watches += watch

    def _exit(self, watch: bool) -> None:
        self.calls -= 1
        self.watches -= watch


def _admitted(
    behaviour: Callable[..., Any],
    enter: Callable[[grpc.aio.ServicerContext], Awaitable[None]],
    exit_: Callable[[], None],
) -> Callable[..., Any]:
    """``behaviour`` (coroutine or async generator) after ``await enter(context)`` (which
    may abort), with ``exit_()`` once it ends, however it ends, when ``enter`` returned."""
    if inspect.isasyncgenfunction(behaviour):

        async def gen(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await enter(context)
            try:
                async with contextlib.aclosing(behaviour(request, context)) as items:
                    async for item in items:
                        yield item
            finally:
                exit_()

        return gen

    async def coro(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await enter(context)
        try:
            return await behaviour(request, context)
        finally:
            exit_()

    return coro


class ClientGoneInterceptor(grpc.aio.ServerInterceptor):
    """A client that disconnects is normal: its RPC ends as cancelled, logged at DEBUG.

    grpc.aio writes the responses of an async-generator handler itself; when the client is
    gone, the write fails in the core with ``ExecuteBatchError``, and whenever that failure
    is processed before the core's cancel notice (often under CPU load) grpc logs it at
    ERROR ("ExecuteBatchError raised in core by servicer method"). Here response streams are
    written by the wrapper instead: it stops writing once the call is done or cancelled,
    turns a core failure of a write (or of an abort of a call that is gone) into a
    cancellation, and closes the handler's generator at once so that its cleanup runs."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        return _wrap(handler, lambda b: _gone_is_cancelled(b, method))


def _client_gone(method: str, exc: BaseException) -> asyncio.CancelledError:
    log.debug("client gone during %s (%s): ending the call as cancelled", method, type(exc).__name__)
    return asyncio.CancelledError()


def _gone_is_cancelled(behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behaviour):

        async def written(request: Any, context: grpc.aio.ServicerContext) -> None:
            responses = behaviour(request, context)
            try:
                async for item in responses:
                    if context.done():  # aborted: gRPC ends the call with that status
                        return
                    if context.cancelled():
                        raise asyncio.CancelledError()
                    await context.write(item)
            except grpc.aio.InternalError as e:  # a core operation on a call that is gone
                raise _client_gone(method, e) from e
            finally:
                await responses.aclose()

        return written

    async def coro(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behaviour(request, context)
        except grpc.aio.InternalError as e:
            raise _client_gone(method, e) from e

    return coro


def _code_name(context: grpc.aio.ServicerContext) -> str:
    if context.cancelled():
        return "CANCELLED"
    code = context.code()
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    for sc in grpc.StatusCode:  # some versions report the integer value
        if sc.value[0] == code:
            return sc.name
    return str(code)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts finished RPCs by service, method and status code (``qwen3tts_rpcs_total``)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        _, service, name = ([*handler_call_details.method.split("/"), "", ""])[:3]

        return _wrap(handler, lambda b: _counted(b, service, name))


def _bracketed(
    behaviour: Callable[..., Any], start: Callable[[grpc.aio.ServicerContext], Callable[[bool], None]]
) -> Callable[..., Any]:
    """``behaviour`` (coroutine or async generator) between ``end = start(context)`` and
    ``end(cancelled)``, where ``cancelled`` says whether the handler's task was cancelled
    (how a client's cancel reaches it: grpc.aio's context reports no code then)."""
    if inspect.isasyncgenfunction(behaviour):

        async def gen(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            end, cancelled = start(context), False
            try:
                async with contextlib.aclosing(behaviour(request, context)) as items:
                    async for item in items:
                        yield item
            except asyncio.CancelledError:
                cancelled = True
                raise
            finally:
                end(cancelled)

        return gen

    async def coro(request: Any, context: grpc.aio.ServicerContext) -> Any:
        end, cancelled = start(context), False
        try:
            return await behaviour(request, context)
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            end(cancelled)

    return coro


def _counted(behaviour: Callable[..., Any], service: str, name: str) -> Callable[..., Any]:
    """``behaviour`` whose end is counted by status code; a cancelled handler counts as
    CANCELLED (not OK: the context reports no code for a client's cancel)."""

    def start(context: grpc.aio.ServicerContext) -> Callable[[bool], None]:
        seen = {"cancelled": False}

        def done(ctx: grpc.aio.ServicerContext) -> None:
            code = "CANCELLED" if seen["cancelled"] else _code_name(ctx)
            metrics.RPCS.labels(service, name, code).inc()

        context.add_done_callback(done)
        return lambda cancelled: seen.__setitem__("cancelled", cancelled)

    return _bracketed(behaviour, start)


class InFlightInterceptor(grpc.aio.ServerInterceptor):
    """Counts RPCs in flight on the given services, so that a drain can wait for them
    (and only them: health watchers and reflection streams never end on their own)."""

    def __init__(self, services: tuple[str, ...]) -> None:
        self._prefixes = tuple(f"/{s}/" for s in services)
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefixes):
            return handler
        return _wrap(handler, self._tracked)

    def _enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def _exit(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    def _tracked(self, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def start(context: grpc.aio.ServicerContext) -> Callable[[bool], None]:
            self._enter()
            return lambda cancelled: self._exit()

        return _bracketed(behaviour, start)


class UndecodableRequest:
    """What a single-request RPC gets instead of its message when the message did not parse."""

    def __init__(self, error: DecodeError) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as e:
            return UndecodableRequest(e)

    return parse


async def _refuse_undecodable(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, UndecodableRequest):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, undecodable_message(request.error))


class UndecodableRequestInterceptor(grpc.aio.ServerInterceptor):
    """Single-request RPCs whose message does not parse end with INVALID_ARGUMENT and a
    message saying why, instead of gRPC's UNKNOWN. (Streamed requests are parsed while the
    handler reads them: ``errors.status_for`` maps their ``DecodeError``.)"""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        return _wrap(
            handler, lambda b: _around(b, _refuse_undecodable), _tolerant(handler.request_deserializer)
        )
