"""The gRPC server: services, health, reflection, auth, TLS, metrics endpoint, drain.

    server = TTSServer(config)          # nothing loaded yet
    await server.start()                # listening; health NOT_SERVING
    await server.load()                 # model loaded and warmed up; health SERVING
    await server.drain(grace_s)         # NOT_SERVING, stop accepting, finish in-flight

``serve(config)`` runs that with SIGTERM/SIGINT handling (the ``serve`` command);
``ServerThread`` runs a server on a background event loop (tests, demos, benchmarks).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from qwen3tts_rt.metrics import MetricsServer
from qwen3tts_rt.model.checkpoint import Checkpoint
from qwen3tts_rt.server import riva_service
from qwen3tts_rt.server.config import ServerConfig
from qwen3tts_rt.server.interceptors import (
    BearerAuthInterceptor,
    ClientGoneInterceptor,
    InFlightInterceptor,
    MetricsInterceptor,
    UnauthenticatedLimitInterceptor,
    UndecodableRequestInterceptor,
    bearer_matches,
)
from qwen3tts_rt.server.runtime import Runtime
from qwen3tts_rt.server.tts_service import TextToSpeechServicer
from qwen3tts_rt.v1 import tts_pb2, tts_pb2_grpc

log = logging.getLogger(__name__)

TTS_SERVICE = tts_pb2.DESCRIPTOR.services_by_name["TextToSpeech"].full_name
SERVICES = (TTS_SERVICE, riva_service.SERVICE_NAME)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class TTSServer:
    def __init__(self, config: ServerConfig, ckpt: Checkpoint | None = None) -> None:
        self.config = config.validated()
        self.runtime = Runtime(self.config, ckpt)
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self.metrics: MetricsServer | None = None
        self.openai: Any = None  # OpenAISpeechServer when config.openai_port is set
        self.port: int | None = None
        self.inflight = InFlightInterceptor(SERVICES)
        self.unauthenticated = UnauthenticatedLimitInterceptor(*self.config.unauthenticated_bounds)
        self._drained = False

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def _set_health(self, status: int) -> None:
        for name in ("", *SERVICES):
            await self.health.set(name, status)

    async def start(self) -> int:
        """Listen (health NOT_SERVING until ``load``); returns the bound port."""
        cfg = self.config
        interceptors: list[grpc.aio.ServerInterceptor] = [
            MetricsInterceptor(),  # outermost: sees every call's final code
            ClientGoneInterceptor(),
            self.unauthenticated,
        ]
        if cfg.auth_token:
            interceptors.append(BearerAuthInterceptor(cfg.auth_token))  # before any body is parsed
        interceptors += [UndecodableRequestInterceptor(), self.inflight]
        server = grpc.aio.server(
            interceptors=interceptors,
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", cfg.max_receive_bytes),
                ("grpc.max_send_message_length", cfg.max_response_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        tts_pb2_grpc.add_TextToSpeechServicer_to_server(TextToSpeechServicer(self.runtime), server)
        riva_service.add_to_server(riva_service.RivaSpeechSynthesisServicer(self.runtime), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        await self._set_health(NOT_SERVING)
        addr = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            creds = grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())])
            self.port = server.add_secure_port(addr, creds)
        else:
            self.port = server.add_insecure_port(addr)
        if not self.port:
            raise OSError(f"could not listen on {addr}")
        await server.start()
        self._server = server
        if cfg.metrics_port is not None:
            token = cfg.metrics_auth_token
            self.metrics = MetricsServer(
                cfg.metrics_port,
                cfg.metrics_host,
                authorized=(lambda value: bearer_matches(value, token)) if token else None,
            )
        if cfg.openai_port is not None:
            from qwen3tts_rt.server.openai_speech import OpenAISpeechServer

            self.openai = OpenAISpeechServer(self.runtime, cfg.openai_host, cfg.openai_port)
            await self.openai.start()
        log.info("listening on %s (%s)", addr, "TLS" if cfg.tls_cert else "plaintext")
        return self.port

    async def load(self) -> None:
        """Load the model, start the engine, warm up; then report SERVING."""
        await asyncio.to_thread(self.runtime.load)
        if not self._drained:
            await self._set_health(SERVING)

    async def drain(self, grace_s: float | None = None) -> None:
        """Report NOT_SERVING and refuse new synthesis and voice calls (UNAVAILABLE),
        give the ones in flight ``grace_s`` to finish, then stop the server (cancelling
        what is left, health watchers included) and the engine. Safe to call twice."""
        if self._drained:
            return
        self._drained = True
        grace = self.config.drain_grace_s if grace_s is None else grace_s
        self.runtime.draining = True
        await self.health.enter_graceful_shutdown()
        # the HTTP endpoint stops listening now; its requests in flight get the same grace
        http_stop = asyncio.create_task(self.openai.stop(grace)) if self.openai is not None else None
        if self.inflight.count:
            log.info("draining: waiting up to %.0f s for %d RPCs in flight", grace, self.inflight.count)
            try:
                await asyncio.wait_for(self.inflight.wait_idle(), grace)
            except asyncio.TimeoutError:
                log.warning("drain grace over: cancelling %d RPCs still in flight", self.inflight.count)
        if self._server is not None:
            await self._server.stop(0.5)
        if http_stop is not None:
            await http_stop
        await asyncio.to_thread(self.runtime.shutdown)
        if self.metrics is not None:
            self.metrics.close()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve(config: ServerConfig, *, ckpt: Checkpoint | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain. Model loading failures end it (re-raised)."""
    server = TTSServer(config, ckpt)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    load = asyncio.create_task(server.load())
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({load, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if load.done():
            load.result()  # raises ModelUnavailableError etc.
            metrics_at = (
                f", /metrics on {config.metrics_host}:{server.metrics.port}" if server.metrics else ""
            )
            if server.openai is not None:
                metrics_at += (
                    f", OpenAI speech on http://{config.openai_host}:{server.openai.port}/v1/audio/speech"
                )
            print(
                f"qwen3tts-rt serving {config.model} on {server.address}{metrics_at}",
                flush=True,
            )
            await stopping
        log.warning("signal received: draining (grace %.0f s)", config.drain_grace_s)
    finally:
        load.cancel()
        stopping.cancel()
        await server.drain()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


T = TypeVar("T")


class ServerThread:
    """A ``TTSServer`` on its own event loop in a background thread."""

    def __init__(self, config: ServerConfig, ckpt: Checkpoint | None = None) -> None:
        self.server = TTSServer(config, ckpt)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qwen3tts-grpc", daemon=True)
        self._thread.start()
        self._stopped = False

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(timeout)

    def start(self, *, load: bool = True) -> ServerThread:
        self.call(self.server.start())
        if load:
            self.load()
        return self

    def load(self) -> None:
        self.call(self.server.load())

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def metrics_port(self) -> int | None:
        return self.server.metrics.port if self.server.metrics else None

    @property
    def openai_port(self) -> int | None:
        """Port of the OpenAI-compatible HTTP endpoint (None: off)."""
        return self.server.openai.port if self.server.openai is not None else None

    def stop(self, grace_s: float = 0.0) -> None:
        """Drain and stop the loop. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self.call(self.server.drain(grace_s))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
