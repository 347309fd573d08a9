"""The gRPC service as a Ray Serve application: N replicas (one per GPU) behind Ray's
gRPC proxy, voices in a shared Redis store. The single-process ``qwen3tts-rt serve``
stays the embedded default; this module only adapts it.

Each replica runs the very servicers of ``qwen3tts-rt serve`` (``TextToSpeechServicer``,
``RivaSpeechSynthesisServicer``) over one ``Runtime`` (model, engine, voice store). Ray's
proxy routes each call by its method name to a replica's method of the same name, with
Ray's per-call context; the methods below hand the call to the servicers through
``RayServicerContext`` (what they use of ``grpc.aio.ServicerContext``), so every status
code and message is the one the single process gives.

* Served: ``qwen3tts_rt.v1.TextToSpeech`` (all of it: StreamSynthesize bidirectional,
  through ``gRPCInputStream``), ``nvidia.riva.tts.RivaSpeechSynthesis`` (Riva's unary
  ``Synthesize`` and ours share the method name; the request's type tells them apart),
  and ``grpc.health.v1.Health/Check``. Reflection lists the services.
* Clients connect to the proxy's gRPC port; with several applications on one Ray
  cluster, calls carry metadata ``application: <name>`` (``APP_NAME`` by default). A
  stream stays on its replica (a gRPC stream is one call); calls end with trailing
  metadata ``qwen3tts-replica: <replica id>``.
* Sizing: one replica holds ``max_sessions`` live streams; Ray sends it at most
  ``max_ongoing_requests`` calls (default: ``max_sessions``) and queues
  ``max_queued_requests`` more per caller before answering RESOURCE_EXHAUSTED; the
  autoscaler aims at ``target_utilization * max_sessions`` ongoing calls per replica.
* Health: Ray's ``check_health`` fails when the model is not loaded or the engine's
  device thread does not run a no-op job within ``health_probe_timeout_s``; Ray then
  replaces the replica. Drain: Ray stops routing to a replica it stops, waits up to
  ``graceful_shutdown_timeout_s`` (``drain_grace_s``) for its calls, then ``__del__``
  stops the engine (streams still open end UNAVAILABLE).
* Not here (the single process has them as interceptors): bearer auth is checked in the
  methods below; TLS, ``max_concurrent_rpcs`` and the per-RPC metrics belong to the proxy
  and to Ray's own metrics.

Start it: ``python -m qwen3tts_rt.server.ray_app --model ...`` (a local Ray cluster, or
``--address`` of one), or ``serve run deploy/ray_serve.yaml`` (docs/DEPLOY.md).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hmac
import logging
import math
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import grpc
from grpc_health.v1 import health_pb2

from qwen3tts_rt.engine.engine import EngineConfig
from qwen3tts_rt.server import riva_service
from qwen3tts_rt.server.config import ServerConfig
from qwen3tts_rt.server.ray_proxy import GRPC_SERVICER_FUNCTIONS
from qwen3tts_rt.v1 import tts_pb2 as pb

log = logging.getLogger(__name__)

APP_NAME = "qwen3tts"
DEPLOYMENT_NAME = "Qwen3TTS"
REPLICA_METADATA_KEY = "qwen3tts-replica"
TTS_SERVICE = pb.DESCRIPTOR.services_by_name["TextToSpeech"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class RayAppConfig:
    """Everything the application takes: the replicas' ``ServerConfig`` and how Ray places,
    sizes and scales them. ``from_args`` builds it from ``serve run`` arguments."""

    server: ServerConfig = field(default_factory=ServerConfig)
    # placement of one replica
    num_gpus: float = 1.0  # one GPU per replica; 0 on CPU
    num_cpus: float = 2.0  # the device thread, the asyncio loop, the clone and I/O pools
    # replicas: a fixed count, or autoscaled between min and max
    num_replicas: int | None = None  # fixed; None: autoscale
    min_replicas: int = 1
    max_replicas: int = 4
    initial_replicas: int | None = None
    target_utilization: float = 0.75  # of max_sessions ongoing calls per replica
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 300.0
    # calls per replica and queued per caller (a proxy); None: max_sessions
    max_ongoing_requests: int | None = None
    max_queued_requests: int = 64
    # health and drain
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    health_probe_timeout_s: float = 10.0  # the engine's device thread must run a no-op job within it
    graceful_shutdown_wait_loop_s: float = 2.0

    @property
    def ongoing_per_replica(self) -> int:
        return self.max_ongoing_requests or self.server.max_sessions

    def validated(self) -> RayAppConfig:
        self.server.validated()
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ValueError("num_gpus and num_cpus must be >= 0")
        if self.num_replicas is not None and self.num_replicas < 1:
            raise ValueError("num_replicas must be >= 1 (or unset to autoscale)")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError("need 0 <= min_replicas <= max_replicas and max_replicas >= 1")
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        if not 0 < self.target_utilization <= 1:
            raise ValueError("target_utilization must be in (0, 1]")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < 1:
            raise ValueError("max_ongoing_requests must be >= 1")
        several = (self.num_replicas is None and self.max_replicas > 1) or (self.num_replicas or 1) > 1
        if several and self.server.voices_url is None:
            raise ValueError(
                "several replicas need one shared voice store: set voices_url=redis://host:port/db "
                "(a voices directory belongs to one process)"
            )
        if self.max_queued_requests < -1:
            raise ValueError("max_queued_requests must be >= 0 (or -1: unbounded)")
        for name in (
            "upscale_delay_s",
            "downscale_delay_s",
            "health_check_period_s",
            "health_check_timeout_s",
            "health_probe_timeout_s",
            "graceful_shutdown_wait_loop_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        return self

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> RayAppConfig:
        """From a flat mapping (``serve run`` config ``args``, or ``key=value`` strings):
        names of this class, of ``ServerConfig`` and of ``EngineConfig``. Unknown names are
        an error, strings are converted to the field's type."""
        own = _field_types(cls)
        own.pop("server")
        server_types = _field_types(ServerConfig)
        server_types.pop("engine")
        engine_types = _field_types(EngineConfig)
        mine: dict[str, Any] = {}
        server: dict[str, Any] = {}
        engine: dict[str, Any] = {}
        for key, value in args.items():
            for target, types in ((mine, own), (server, server_types), (engine, engine_types)):
                if key in types:
                    target[key] = _convert(key, value, types[key])
                    break
            else:
                raise ValueError(f"unknown setting '{key}' (see RayAppConfig, ServerConfig, EngineConfig)")
        server.setdefault("metrics_port", None)  # Ray exports its own metrics; opt in per replica
        cfg = cls(server=ServerConfig(engine=EngineConfig(**engine), **server), **mine)
        return cfg.validated()

    def deployment_options(self) -> dict[str, Any]:
        """``Deployment.options(...)`` for these settings."""
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus},
            "max_ongoing_requests": self.ongoing_per_replica,
            "max_queued_requests": self.max_queued_requests,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.server.drain_grace_s,
            "graceful_shutdown_wait_loop_s": self.graceful_shutdown_wait_loop_s,
        }
        if self.num_replicas is not None:
            opts["num_replicas"] = self.num_replicas
        else:
            target = max(1, math.floor(self.target_utilization * self.server.max_sessions))
            opts["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "initial_replicas": self.initial_replicas,
                "target_ongoing_requests": target,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
            }
        return opts


def _field_types(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _convert(key: str, value: Any, typ: Any) -> Any:
    """A ``key=value`` string (or a YAML scalar) as the field's type."""
    text = str(value)
    kinds = set(getattr(typ, "__args__", ())) or {typ}
    if value is None or (type(None) in kinds and text.lower() in ("none", "null", "")):
        return None
    kinds.discard(type(None))
    kind = next(iter(kinds)) if len(kinds) == 1 else str
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is Path:
            return Path(text)
        if kind is str:
            return text
    except ValueError:
        what = {int: "an integer", float: "a number", bool: "true or false"}.get(kind, str(kind))
        raise ValueError(f"setting '{key}': {text!r} is not {what}") from None
    raise ValueError(f"setting '{key}' cannot be given as a value here")


# --------------------------------------------------------------------------- the servicers' context


class RayServicerContext:
    """What the servicers use of ``grpc.aio.ServicerContext``, over Ray Serve's per-call
    ``RayServegRPCContext`` (None for calls through a ``DeploymentHandle``). ``abort`` sets
    the status on Ray's context and raises; Ray's replica turns a raised exception with a
    status set into that status at the proxy."""

    def __init__(self, ctx: Any, replica: str, started: float | None = None) -> None:
        self._ctx = ctx
        self._replica = replica
        self._trailing: list[tuple[str, str]] = [(REPLICA_METADATA_KEY, replica)]
        self._started = time.monotonic() if started is None else started
        if ctx is not None:
            ctx.set_trailing_metadata(list(self._trailing))

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        if self._ctx is not None:
            self._ctx.set_code(code)
            self._ctx.set_details(details)
            if trailing_metadata:
                self.set_trailing_metadata(trailing_metadata)
        raise grpc.aio.AbortError(f"{code.name}: {details}")

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return list(self._ctx.invocation_metadata()) if self._ctx is not None else []

    def peer(self) -> str:
        return str(self._ctx.peer()) if self._ctx is not None else ""

    def set_code(self, code: grpc.StatusCode) -> None:
        if self._ctx is not None:
            self._ctx.set_code(code)

    def set_details(self, details: str) -> None:
        if self._ctx is not None:
            self._ctx.set_details(details)

    def code(self) -> Any:
        return self._ctx.code() if self._ctx is not None else None

    def details(self) -> str:
        return str(self._ctx.details() or "") if self._ctx is not None else ""

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._trailing = [(REPLICA_METADATA_KEY, self._replica), *metadata]
        if self._ctx is not None:
            self._ctx.set_trailing_metadata(list(self._trailing))

    def trailing_metadata(self) -> list[tuple[str, str]]:
        return list(self._trailing)

    def time_remaining(self) -> float | None:
        return None  # the proxy holds the deadline; Ray's request_timeout_s bounds the call

    def cancelled(self) -> bool:
        return False  # a cancel arrives as asyncio.CancelledError in the method

    def done(self) -> bool:
        return False


async def _one(item: Any) -> AsyncIterator[Any]:
    yield item


def _as_stream(requests: Any) -> AsyncIterator[Any]:
    """A request stream, whether Ray passes an iterator or (unary-in calls) one message."""
    return requests if hasattr(requests, "__anext__") else _one(requests)


# --------------------------------------------------------------------------- the deployment


class Qwen3TTSReplica:
    """One replica: a ``Runtime`` and the servicers over it (module docstring). The
    public methods are the RPC method names the proxy routes to."""

    def __init__(self, server_config: ServerConfig, health_probe_timeout_s: float = 10.0) -> None:
        from ray import serve

        from qwen3tts_rt.server.riva_service import RivaSpeechSynthesisServicer
        from qwen3tts_rt.server.runtime import Runtime
        from qwen3tts_rt.server.tts_service import TextToSpeechServicer

        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # built outside a Serve replica (tests of the class itself)
            self.replica_id = "local"
        self.config = server_config.validated()
        self.health_probe_timeout_s = health_probe_timeout_s
        self._expected_auth = (
            f"Bearer {self.config.auth_token}".encode() if self.config.auth_token is not None else None
        )
        self.runtime = Runtime(self.config)
        self._closed = False
        self.metrics: Any = None
        self.runtime.load()  # blocking: Ray waits for the constructor before routing here
        self.tts = TextToSpeechServicer(self.runtime)
        self.riva = RivaSpeechSynthesisServicer(self.runtime)
        if self.config.metrics_port is not None:
            from qwen3tts_rt.metrics import MetricsServer

            self.metrics = MetricsServer(self.config.metrics_port, self.config.metrics_host)
        log.info("replica %s serving %s (voices: %s)", self.replica_id, self.config.model, self._store_where)

    @property
    def _store_where(self) -> str:
        return self.runtime.store.location if self.runtime.store is not None else "-"

    async def _context(self, grpc_context: Any) -> RayServicerContext:
        ctx = RayServicerContext(grpc_context, self.replica_id)
        if self._expected_auth is not None and grpc_context is not None and not self._authorized(ctx):
            await ctx.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong credentials: send metadata 'authorization: Bearer <token>'",
            )
        return ctx

    def _authorized(self, ctx: RayServicerContext) -> bool:
        assert self._expected_auth is not None
        for key, value in ctx.invocation_metadata():
            if key.lower() == "authorization":
                got = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(got, self._expected_auth)
        return False

    # ------------------------------------------------------------------ qwen3tts_rt.v1.TextToSpeech

    async def StreamSynthesize(self, request_stream: Any, grpc_context: Any = None) -> AsyncIterator[Any]:
        ctx = await self._context(grpc_context)
        async for resp in self.tts.StreamSynthesize(_as_stream(request_stream), ctx):
            yield resp

    async def Synthesize(self, request: Any, grpc_context: Any = None) -> Any:
        """Ours (server streaming: returns the stream) or Riva's (unary), by request type."""
        ctx = await self._context(grpc_context)
        if isinstance(request, pb.SynthesizeRequest):
            return self.tts.Synthesize(request, ctx)
        return await self.riva.Synthesize(request, ctx)

    async def CreateVoice(self, request: pb.CreateVoiceRequest, grpc_context: Any = None) -> pb.Voice:
        return await self.tts.CreateVoice(request, await self._context(grpc_context))

    async def GetVoice(self, request: pb.GetVoiceRequest, grpc_context: Any = None) -> pb.Voice:
        return await self.tts.GetVoice(request, await self._context(grpc_context))

    async def ListVoices(self, request: pb.ListVoicesRequest, grpc_context: Any = None) -> Any:
        return await self.tts.ListVoices(request, await self._context(grpc_context))

    async def DeleteVoice(self, request: pb.DeleteVoiceRequest, grpc_context: Any = None) -> Any:
        return await self.tts.DeleteVoice(request, await self._context(grpc_context))

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, grpc_context: Any = None) -> Any:
        return await self.tts.GetServerInfo(request, await self._context(grpc_context))

    # ------------------------------------------------------------------ nvidia.riva.tts.RivaSpeechSynthesis

    async def SynthesizeOnline(self, request_stream: Any, grpc_context: Any = None) -> AsyncIterator[Any]:
        ctx = await self._context(grpc_context)
        async for resp in self.riva.SynthesizeOnline(_as_stream(request_stream), ctx):
            yield resp

    async def GetRivaSynthesisConfig(self, request: Any, grpc_context: Any = None) -> Any:
        return await self.riva.GetRivaSynthesisConfig(request, await self._context(grpc_context))

    # ------------------------------------------------------------------ grpc.health.v1.Health

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None) -> Any:
        """SERVING once this replica's model is loaded and until it drains (no auth, as in
        the single process). Unknown service names: NOT_FOUND."""
        ctx = RayServicerContext(grpc_context, self.replica_id)
        if request.service not in ("", TTS_SERVICE, riva_service.SERVICE_NAME):
            await ctx.abort(grpc.StatusCode.NOT_FOUND, f"unknown service '{request.service[:80]}'")
        ok = self.runtime.ready and not self.runtime.draining
        return health_pb2.HealthCheckResponse(status=SERVING if ok else NOT_SERVING)

    # ------------------------------------------------------------------ Ray's hooks

    async def check_health(self) -> None:
        """Ray's health check: raises (and Ray replaces the replica) when the model is not
        serving or the device thread does not run a no-op job in time."""
        if not self.runtime.ready:
            raise RuntimeError("the runtime is not ready (stopped or failed)")
        fut = self.runtime.require_engine().submit(lambda: None)
        try:
            await asyncio.wait_for(asyncio.wrap_future(fut), self.health_probe_timeout_s)
        except asyncio.TimeoutError:
            raise RuntimeError(
                f"the engine's device thread did not answer within {self.health_probe_timeout_s} s"
            ) from None

    def record_routing_stats(self) -> dict[str, Any]:
        """Live streams of this replica (Ray's routing stats; also read by tests and tools)."""
        engine = self.runtime.engine
        return {
            "replica_id": self.replica_id,
            "live_sessions": engine.live_sessions if engine is not None else 0,
            "max_sessions": self.config.max_sessions,
            "ready": self.runtime.ready,
        }

    def __del__(self) -> None:
        """Ray's graceful shutdown, after the drain: stop the engine (streams still open end
        UNAVAILABLE), the pools, the store's connections. Safe to call twice."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self.runtime.draining = True
        self.runtime.shutdown()
        if self.runtime.store is not None:
            self.runtime.store.close()
        if self.metrics is not None:
            self.metrics.close()


def build_app(args: dict[str, Any] | None = None, *, config: RayAppConfig | None = None) -> Any:
    """The Serve application (``serve run qwen3tts_rt.server.ray_app:build_app k=v ...``, or
    ``import_path`` of a config file with ``args``): the ``Qwen3TTSReplica`` deployment
    with the options of ``config`` (default: built from ``args``)."""
    from ray import serve

    cfg = config if config is not None else RayAppConfig.from_args(args or {})
    deployment = serve.deployment(name=DEPLOYMENT_NAME)(Qwen3TTSReplica)
    return deployment.options(**cfg.deployment_options()).bind(cfg.server, cfg.health_probe_timeout_s)


def grpc_options(port: int, *, request_timeout_s: float | None = None) -> Any:
    """The proxy's gRPC options for this application's services."""
    from ray.serve.config import gRPCOptions

    return gRPCOptions(
        port=port,
        grpc_servicer_functions=list(GRPC_SERVICER_FUNCTIONS),
        request_timeout_s=request_timeout_s,
        enable_reflection=True,
    )


# --------------------------------------------------------------------------- a local start

#: Seconds Serve's controller waits for a new proxy actor to answer ``ready`` before it
#: kills it as unhealthy. Ray's default (5 s) is shorter than starting a Python worker on
#: a loaded host: the first proxy was killed before it ran and ``serve.start`` failed.
PROXY_READY_TIMEOUT_S = 60.0
_PROXY_READY_ENV = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"


def patient_proxy_env() -> None:
    """Give the proxy ``PROXY_READY_TIMEOUT_S`` to start, unless the environment already
    says otherwise. Call before ``ray.init`` starts a local cluster: its processes (the
    Serve controller among them) inherit this environment. A cluster joined by address
    keeps its own setting (docs/DEPLOY.md)."""
    os.environ.setdefault(_PROXY_READY_ENV, str(PROXY_READY_TIMEOUT_S))


def main(argv: list[str] | None = None) -> int:
    """Start a Ray cluster here (or join ``--address``), the proxy on ``--grpc-port`` and
    the application; run until SIGTERM/SIGINT, then delete it (graceful drain)."""
    ap = argparse.ArgumentParser(
        prog="python -m qwen3tts_rt.server.ray_app",
        description="Serve qwen3tts-rt as a Ray Serve application (settings: name=value)",
    )
    ap.add_argument(
        "settings", nargs="*", help="RayAppConfig/ServerConfig/EngineConfig settings as name=value"
    )
    ap.add_argument("--address", help="an existing Ray cluster (default: start one here)")
    ap.add_argument("--num-cpus", type=float, help="CPUs of the local cluster (default: all)")
    ap.add_argument("--grpc-port", type=int, default=9000, help="the proxy's gRPC port (default %(default)s)")
    ap.add_argument("--http-port", type=int, default=8000, help="the proxy's HTTP port (default %(default)s)")
    ap.add_argument("--host", default="127.0.0.1", help="proxy listen address (default %(default)s)")
    ap.add_argument("--name", default=APP_NAME, help="application name (default %(default)s)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings: dict[str, str] = {}
    for item in a.settings:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"settings are name=value, got {item!r}")
        settings[key.replace("-", "_")] = value
    try:
        cfg = RayAppConfig.from_args(settings)
    except (ValueError, TypeError) as e:
        ap.error(str(e))

    import ray
    from ray import serve

    if a.address:
        ray.init(address=a.address)
    else:
        patient_proxy_env()
        ray.init(num_cpus=a.num_cpus, include_dashboard=False)
    serve.start(
        http_options={"host": a.host, "port": a.http_port},
        grpc_options=grpc_options(a.grpc_port),
    )
    serve.run(build_app(config=cfg), name=a.name, route_prefix=f"/{a.name}")
    print(f"qwen3tts-rt on Ray Serve: gRPC {a.host}:{a.grpc_port}, metadata application={a.name}", flush=True)
    stop = asyncio.Event()

    async def wait() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()

    asyncio.run(wait())
    serve.delete(a.name)  # graceful: Ray drains every replica
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
