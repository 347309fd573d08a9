"""The agent's HTTP side (aiohttp): the page, signalling and /metrics.

    GET  /          the browser page (static/index.html; plain HTML + JS, no build step)
    GET  /config    what the page needs before it offers: ICE servers, mode, voice
    POST /offer     {"sdp": ..., "type": "offer"} -> {"sdp": ..., "type": "answer", "id": ...}
                    bounded: body <= max_offer_bytes (413), offer_burst / offer_rate_per_min
                    per client address (429 + Retry-After), max_peers calls at once (503)
    GET  /healthz   200 "ok"
    GET  /metrics   Prometheus, on its own port (``metrics_port``)

``AgentServer`` owns the shared clients (TTS channel, HTTP session for the LLM and ASR) and
the live peer connections; ``serve(config)`` runs it until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import signal
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiortc import RTCSessionDescription
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from agent.asr import ASRClient
from agent.clock import Clock, SystemClock
from agent.config import AgentConfig
from agent.errors import BadRequestError, OverloadedError, TTSError
from agent.llm import LLMClient
from agent.peer import PeerSession
from agent.tts import TTSClient

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"


def pin_ice_host_addresses(addresses: tuple[str, ...]) -> None:
    """Make aioice offer exactly these local addresses as host candidates.

    aioice has no setting for it and leaves 127.0.0.1 out of its host candidates, so a call
    between two processes of one machine over loopback (tests, a single-host setup behind a
    reverse proxy) needs this. It is process-wide: every aiortc peer of the process uses it.
    """
    if not addresses:
        return
    import aioice.ice

    pinned = list(addresses)

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in pinned if (use_ipv6 if ":" in a else use_ipv4)]

    aioice.ice.get_host_addresses = host_addresses


def _bound_port(runner: web.AppRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            return int(addr[1])
    raise RuntimeError("the HTTP site has no bound address")


class RateLimiter:
    """Token buckets by key (the client address): each holds at most ``burst`` tokens and
    refills at ``rate_per_min``; a request takes one. Reads an injectable clock, so tests
    need no sleeps. At most ``max_keys`` buckets are kept (the least recently seen go
    first: a forgotten client starts again with a full bucket)."""

    def __init__(self, rate_per_min: float, burst: int, clock: Clock, *, max_keys: int = 10_000) -> None:
        self.rate_per_s = rate_per_min / 60.0
        self.burst = float(burst)
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def take(self, key: str) -> float:
        """0.0 when ``key`` may go ahead (a token is taken), else the seconds until it may."""
        if not self.enabled:
            return 0.0
        now = self.clock.now()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate_per_s)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate_per_s
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)


class AgentServer:
    def __init__(self, config: AgentConfig, *, clock: Clock | None = None) -> None:
        self.config = config.validated()
        self.clock = clock or SystemClock()
        self.peers: dict[str, PeerSession] = {}
        c = self.config
        self.offer_limiter = RateLimiter(
            c.offer_rate_per_min, c.offer_burst, self.clock, max_keys=c.offer_rate_clients
        )
        self.tts: TTSClient | None = None
        self.llm: LLMClient | None = None
        self.asr: ASRClient | None = None
        self._http: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._metrics_runner: web.AppRunner | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._stopped = False

    @property
    def url(self) -> str:
        return f"http://{self.config.http_host}:{self.port}"

    # ------------------------------------------------------------------ lifetime

    async def start(self) -> int:
        """Serve HTTP (and /metrics); returns the bound HTTP port."""
        c = self.config
        pin_ice_host_addresses(c.ice_host_addresses)
        self.tts = TTSClient(c.tts)
        self._http = aiohttp.ClientSession()
        self.llm = LLMClient(c.llm, self._http) if c.llm.url else None
        self.asr = ASRClient(c.asr, self._http) if c.asr.url else None

        app = web.Application(client_max_size=c.max_offer_bytes)
        app.router.add_get("/", self._index)
        app.router.add_get("/config", self._config)
        app.router.add_post("/offer", self._offer)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_static("/static/", STATIC_DIR)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, c.http_host, c.http_port).start()
        self.port = _bound_port(self._runner)

        if c.metrics_port is not None:
            mapp = web.Application()
            mapp.router.add_get("/metrics", self._metrics)
            self._metrics_runner = web.AppRunner(mapp, access_log=None)
            await self._metrics_runner.setup()
            await web.TCPSite(self._metrics_runner, c.metrics_host, c.metrics_port).start()
            self.metrics_port = _bound_port(self._metrics_runner)
        return self.port

    async def check_tts(self, timeout: float = 5.0) -> str:
        """One line about the TTS server (raises ``TTSError`` if it does not answer)."""
        assert self.tts is not None
        info = await self.tts.server_info(timeout)
        return (
            f"{info.model_id} ({info.model_kind}, {info.device}, speakers: {', '.join(info.speakers) or '-'})"
        )

    async def stop(self) -> None:
        """Hang up every call, close the clients, stop serving. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        await asyncio.gather(*(p.close() for p in list(self.peers.values())), return_exceptions=True)
        for runner in (self._runner, self._metrics_runner):
            if runner is not None:
                await runner.cleanup()
        if self._http is not None:
            await self._http.close()
        if self.tts is not None:
            await self.tts.close()

    # ------------------------------------------------------------------ handlers

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _config(self, request: web.Request) -> web.Response:
        c = self.config
        return web.json_response(
            {
                "iceServers": [s.as_dict() for s in c.ice_servers],
                "mode": "say" if c.say_mode else "llm",
                "asr": bool(c.asr.url),
                "voice": self.tts.voice if self.tts else "",
                "maxTextChars": c.max_text_chars,
            }
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _offer(self, request: web.Request) -> web.Response:
        wait = self.offer_limiter.take(request.remote or "unknown")
        if wait > 0:  # before the body is read: a refused client costs nothing
            c = self.config
            return web.json_response(
                {
                    "error": f"too many offers from {request.remote}: at most {c.offer_burst} at once "
                    f"and {c.offer_rate_per_min:g} per minute; retry in {math.ceil(wait)} s"
                },
                status=429,
                headers={"Retry-After": str(math.ceil(wait))},
            )
        try:
            offer = await self._read_offer(request)
            if len(self.peers) >= self.config.max_peers:
                raise OverloadedError(f"{len(self.peers)} calls in progress; at most {self.config.max_peers}")
        except web.HTTPRequestEntityTooLarge:
            limit = self.config.max_offer_bytes
            return web.json_response(
                {"error": f"the offer is larger than {limit} bytes (max_offer_bytes)"}, status=413
            )
        except BadRequestError as e:
            return web.json_response({"error": str(e)}, status=400)
        except OverloadedError as e:
            return web.json_response({"error": str(e)}, status=503)
        assert self.tts is not None
        peer = PeerSession(
            self.config, tts=self.tts, llm=self.llm, asr=self.asr, clock=self.clock, on_closed=self._forget
        )
        self.peers[peer.id] = peer
        try:
            answer = await peer.accept(offer)
        except Exception as e:  # aiortc rejects the SDP (ValueError and friends)
            await peer.close()
            log.info("offer rejected: %s", e)
            return web.json_response({"error": f"offer rejected: {e}"}, status=400)
        log.info("peer %s: answered (%d calls)", peer.id, len(self.peers))
        return web.json_response({"sdp": answer.sdp, "type": answer.type, "id": peer.id})

    async def _read_offer(self, request: web.Request) -> RTCSessionDescription:
        try:
            body: Any = await request.json()
        except web.HTTPRequestEntityTooLarge:
            raise
        except ValueError as e:
            raise BadRequestError(f"body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequestError('body must be {"sdp": ..., "type": "offer"}')
        sdp, kind = body.get("sdp"), body.get("type")
        if kind != "offer":
            raise BadRequestError(f"type must be 'offer', not {kind!r}")
        if not isinstance(sdp, str) or not sdp.startswith("v=0"):
            raise BadRequestError("sdp must be an SDP string (starting with 'v=0')")
        return RTCSessionDescription(sdp=sdp, type="offer")

    def _forget(self, peer: PeerSession) -> None:
        self.peers.pop(peer.id, None)


async def serve(config: AgentConfig) -> None:
    """Run until SIGTERM/SIGINT."""
    server = AgentServer(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        try:
            tts = await server.check_tts()
        except TTSError as e:
            tts = f"not answering yet ({e})"
        c = config
        llm = f"LLM {c.llm.url} (model {c.llm.model})" if c.llm.url else "say mode (no LLM)"
        asr = f"ASR {c.asr.url}" if c.asr.url else "no ASR"
        metrics_at = f", /metrics on {c.metrics_host}:{server.metrics_port}" if server.metrics_port else ""
        print(f"qwen3tts-agent on {server.url}{metrics_at}", flush=True)
        print(f"TTS {c.tts.address}: {tts}; voice {server.tts.voice if server.tts else '-'}", flush=True)
        print(f"{llm}; {asr}", flush=True)
        await stop.wait()
    finally:
        await server.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
