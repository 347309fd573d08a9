"""Every Prometheus metric of qwen3tts-rt, in one module, with explicit buckets.

Latency histograms are dense between 5 ms and 2 s (where first-packet latencies of a
real-time TTS live) and sparse beyond. The gRPC server records into these; the
``/metrics`` endpoint is served by :class:`MetricsServer`.

Names (all prefixed ``qwen3tts_``):

* ``first_packet_latency_seconds{api}`` — first text delta of an utterance received by
  the server -> first audio of that utterance written to the stream.
* ``time_to_first_audio_seconds{api}`` — stream start -> first audio written.
* ``inter_packet_gap_seconds{api}`` — between consecutive audio writes of one utterance.
* ``real_time_factor{api}`` — compute time / audio time of a finished utterance.
* ``queue_wait_seconds{api}`` — a PCM packet's wait between the engine emitting it and
  the server writing it (the per-session output queue: grows when a client reads slowly).
* ``batch_size`` / ``engine_tick_seconds`` — utterances stepped together per engine tick,
  and the tick's duration.
* ``live_sessions`` — engine sessions open now (every engine of the process).
* ``rpcs_total{service,method,code}`` — finished RPCs by status code.
* ``utterances_total{api,reason}``, ``audio_seconds_total{api}``.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

# Dense between 5 ms and 2 s: 5 ms steps to 50 ms, 10-20 ms steps to 200 ms, then wider.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.005, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.045, 0.050,
    0.060, 0.070, 0.080, 0.090, 0.100, 0.120, 0.140, 0.160, 0.180, 0.200,
    0.250, 0.300, 0.350, 0.400, 0.450, 0.500, 0.600, 0.700, 0.800, 0.900,
    1.000, 1.250, 1.500, 1.750, 2.000, 3.000, 5.000, 10.00,
)  # fmt: skip
# Real-time factor (compute / audio): below 1 is faster than real time.
RTF_BUCKETS: tuple[float, ...] = (
    0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)

FIRST_PACKET_LATENCY = Histogram(
    "qwen3tts_first_packet_latency_seconds",
    "First text delta of an utterance received by the server -> first audio of it written to the stream",
    ["api"],
    buckets=LATENCY_BUCKETS,
)
TIME_TO_FIRST_AUDIO = Histogram(
    "qwen3tts_time_to_first_audio_seconds",
    "Stream start (RPC accepted) -> first audio written to the stream",
    ["api"],
    buckets=LATENCY_BUCKETS,
)
INTER_PACKET_GAP = Histogram(
    "qwen3tts_inter_packet_gap_seconds",
    "Time between consecutive audio writes of one utterance",
    ["api"],
    buckets=LATENCY_BUCKETS,
)
REAL_TIME_FACTOR = Histogram(
    "qwen3tts_real_time_factor",
    "Compute time / audio time of a finished utterance",
    ["api"],
    buckets=RTF_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "qwen3tts_queue_wait_seconds",
    "PCM packet emitted by the engine -> written to the stream (per-session output queue wait)",
    ["api"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "qwen3tts_batch_size",
    "Utterances stepped together in one engine tick",
    buckets=BATCH_BUCKETS,
)
ENGINE_TICK = Histogram(
    "qwen3tts_engine_tick_seconds",
    "Duration of one engine tick (batched talker + code-predictor + decoder steps)",
    buckets=LATENCY_BUCKETS,
)
DECODER_SECONDS = Counter("qwen3tts_decoder_seconds", "Seconds spent in codec decoder calls")
DECODED_FRAMES = Counter("qwen3tts_decoded_frames", "Codec frames decoded by those calls")
DECODER_CALLS = Counter(
    "qwen3tts_decoder_calls", "Codec decoder calls (one per batch of slots with the same frame count)"
)
PACKET_FRAMES = Histogram(
    "qwen3tts_packet_frames",
    "Codec frames (80 ms each) per audio packet the engine emitted",
    ["api"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16),
)
LIVE_SESSIONS = Gauge("qwen3tts_live_sessions", "Engine sessions open now")
RPCS = Counter("qwen3tts_rpcs", "Finished RPCs by status code", ["service", "method", "code"])
UTTERANCES = Counter("qwen3tts_utterances", "Finished utterances by reason", ["api", "reason"])
AUDIO_SECONDS = Counter("qwen3tts_audio_seconds", "Seconds of audio written to clients", ["api"])


class _HasLiveSessions(Protocol):
    @property
    def live_sessions(self) -> int: ...


_engines: weakref.WeakSet[_HasLiveSessions] = weakref.WeakSet()
_engines_lock = threading.Lock()


def _live_sessions() -> float:
    with _engines_lock:
        return float(sum(e.live_sessions for e in list(_engines)))


LIVE_SESSIONS.set_function(_live_sessions)


def track_engine(engine: _HasLiveSessions) -> None:
    """Count ``engine.live_sessions`` into the live-sessions gauge (until untracked or gone)."""
    with _engines_lock:
        _engines.add(engine)


def untrack_engine(engine: _HasLiveSessions) -> None:
    with _engines_lock:
        _engines.discard(engine)


def observe_tick(batch_size: int, seconds: float) -> None:
    """Engine tick observer (called on the device worker thread)."""
    BATCH_SIZE.observe(batch_size)
    ENGINE_TICK.observe(seconds)


def observe_decode(frames_per_slot: int, slots: int, seconds: float) -> None:
    """Engine decoder-call observer (called on the device worker thread)."""
    DECODER_SECONDS.inc(seconds)
    DECODED_FRAMES.inc(frames_per_slot * slots)
    DECODER_CALLS.inc()


METRICS_PATH = "/metrics"


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def _guarded_app(registry: CollectorRegistry, authorized: Callable[[str | None], bool] | None) -> Any:
    """prometheus-client's WSGI app, answering ``/metrics`` only, and only to requests whose
    ``Authorization`` header ``authorized`` accepts (when given)."""
    app = make_wsgi_app(registry)

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") != METRICS_PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [f"not found: metrics are at {METRICS_PATH}\n".encode()]
        if authorized is not None and not authorized(environ.get("HTTP_AUTHORIZATION")):
            start_response(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="metrics"')],
            )
            return [b"send 'Authorization: Bearer <metrics token>'\n"]
        result: Iterable[bytes] = app(environ, start_response)
        return result

    return guarded


class MetricsServer:
    """``/metrics`` over HTTP on its own thread (prometheus-client's WSGI app). Only that
    path answers (404 elsewhere); with ``authorized``, a request whose ``Authorization``
    header it refuses gets 401."""

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        registry: CollectorRegistry = REGISTRY,
        authorized: Callable[[str | None], bool] | None = None,
    ) -> None:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

        class Server(socketserver.ThreadingMixIn, WSGIServer):
            daemon_threads = True
            address_family = family

        self._httpd = make_server(
            host, port, _guarded_app(registry, authorized), server_class=Server, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        self.host = host
        self.port = int(self._httpd.server_port)  # the bound port (``port=0`` picks a free one)
        self._closed = False

    def close(self) -> None:
        """Stop serving. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
