"""Server interceptors: bearer-token auth, per-RPC status counting, RPCs in flight, and
requests that do not parse."""

from __future__ import annotations

import asyncio
import hmac
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from qwen3tts_rt import metrics
from qwen3tts_rt.server.errors import undecodable_message

HEALTH_PREFIX = "/grpc.health.v1.Health/"


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
            async for item in behaviour(request, context):
                yield item

        return gen

    async def coro(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await before(request, context)
        return await behaviour(request, context)

    return coro


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC except health checks needs ``authorization: Bearer <token>`` metadata
    (compared in constant time); otherwise UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def _ok(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key.lower() == "authorization":
                got = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(got, self._expected)
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

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong credentials: send metadata 'authorization: Bearer <token>'",
            )

        return _wrap(handler, lambda b: _around(b, deny))


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
                async for item in behaviour(request, context):
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
