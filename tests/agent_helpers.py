"""Helpers of the agent tests: a manual clock, OpenAI-compatible LLM and ASR stub servers
(real HTTP on 127.0.0.1), espeak-ng speech, and an aiortc client peer with a scripted
microphone and a recording speaker."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import io
import json
import re
import shutil
import subprocess
import time
import wave
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

ESPEAK = shutil.which("espeak-ng")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
RATE = 48000
FRAME = 960  # 20 ms at 48 kHz


class ManualClock:
    """A clock that moves only when told to (``advance``) or when something sleeps until a
    later time (the sleep returns at once, with the clock moved there)."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt

    async def sleep_until(self, t: float) -> None:
        self.sleeps.append(t)
        self.t = max(self.t, t)
        await asyncio.sleep(0)


def words(text: str) -> list[str]:
    """``text`` as LLM-like tokens: each word with its leading space."""
    return re.findall(r"\s*\S+", text)


# --------------------------------------------------------------------------- speech


def espeak(text: str, rate: int = RATE, words_per_minute: int = 165) -> np.ndarray:
    """[S] int16: ``text`` spoken by espeak-ng (Debian package), resampled to ``rate``."""
    assert ESPEAK, "espeak-ng is not installed"
    wav = subprocess.run(
        [ESPEAK, "-v", "en-us", "-s", str(words_per_minute), "--stdout", text],
        check=True,
        capture_output=True,
        timeout=30,
    ).stdout
    with wave.open(io.BytesIO(wav)) as w:
        src_rate = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32)
    n = round(len(x) * rate / src_rate)
    y = np.interp(np.arange(n) * src_rate / rate, np.arange(len(x)), x)
    return np.clip(np.round(y), -32768, 32767).astype(np.int16)


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return path


def silence(seconds: float, rate: int = RATE) -> np.ndarray:
    return np.zeros(round(seconds * rate), np.int16)


# --------------------------------------------------------------------------- HTTP stubs


class _Stub:
    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self.port = 0

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self) -> str:
        app = web.Application()
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.url

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class LLMStub(_Stub):
    """``POST /v1/chat/completions`` with ``stream=true``: the n-th request gets the n-th
    script (the last one repeats), one server-sent event per token every ``interval`` s,
    shaped like vLLM's / OpenAI's chunks. Records request bodies and headers."""

    def __init__(self, scripts: Sequence[Sequence[str]], interval: float = 0.02, status: int = 200) -> None:
        super().__init__()
        self.scripts = [list(s) for s in scripts]
        self.interval = interval
        self.status = status
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.tokens_sent: list[int] = []
        self.aborted = 0  # requests the client hung up on mid-stream
        self.first_token_at: list[float] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._completions)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        i = len(self.requests)
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        self.tokens_sent.append(0)
        if self.status != 200:
            return web.json_response({"error": {"message": "scripted failure"}}, status=self.status)
        script = self.scripts[min(i, len(self.scripts) - 1)]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
            ev = {
                "id": f"chatcmpl-{i}",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": body.get("model", ""),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(ev)}\n\n".encode()

        try:
            await resp.write(chunk({"role": "assistant"}))
            for tok in script:
                await asyncio.sleep(self.interval)
                await resp.write(chunk({"content": tok}))
                if self.tokens_sent[i] == 0:
                    self.first_token_at.append(time.monotonic())
                self.tokens_sent[i] += 1
            await resp.write(chunk({}, "stop"))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:  # the client hung up (aiohttp's ClientConnectionResetError)
            self.aborted += 1
        except asyncio.CancelledError:
            self.aborted += 1
            raise
        return resp


class ASRStub(_Stub):
    """``POST /v1/audio/transcriptions``: answers the n-th request with the n-th text (the
    last repeats); keeps each uploaded file and form."""

    def __init__(self, texts: Sequence[str], delay: float = 0.0) -> None:
        super().__init__()
        self.texts = list(texts)
        self.delay = delay  # seconds before answering
        self.files: list[bytes] = []
        self.forms: list[dict[str, str]] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/audio/transcriptions", self._transcribe)

    async def _transcribe(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form["file"]
        assert isinstance(upload, web.FileField)
        self.files.append(upload.file.read())
        self.forms.append({k: v for k, v in form.items() if isinstance(v, str)})
        text = self.texts[min(len(self.files) - 1, len(self.texts) - 1)]
        await asyncio.sleep(self.delay)
        return web.json_response({"text": text})


async def scrape_async(port: int) -> dict[str, Any]:
    """/metrics as {family name: family}, without blocking the event loop (the agent's
    endpoint is served by the test's own loop)."""
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    return {f.name: f for f in text_string_to_metric_families(text)}


def wav_seconds(data: bytes) -> float:
    with wave.open(io.BytesIO(data)) as w:
        return w.getnframes() / w.getframerate()


# --------------------------------------------------------------------------- an aiortc client peer


class ScriptedMic(MediaStreamTrack):
    """A microphone that sends queued 48 kHz mono samples in real time, silence otherwise."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._queue: deque[np.ndarray] = deque()
        self._start: float | None = None
        self._pts = 0
        self.done_at: float | None = None  # when the last queued sample went out

    def play(self, samples: np.ndarray) -> None:
        self._queue.append(samples.astype(np.int16))
        self.done_at = None

    @property
    def playing(self) -> bool:
        return bool(self._queue)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._pts / RATE - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        data = np.zeros(FRAME, np.int16)
        filled = 0
        while filled < FRAME and self._queue:
            head = self._queue[0]
            take = min(FRAME - filled, head.size)
            data[filled : filled + take] = head[:take]
            filled += take
            if take == head.size:
                self._queue.popleft()
                if not self._queue:
                    self.done_at = time.monotonic()
            else:
                self._queue[0] = head[take:]
        frame = av.AudioFrame.from_ndarray(data.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, RATE)
        self._pts += FRAME
        return frame


@dataclass
class Heard:
    at: float  # arrival (monotonic)
    rms: float


class ClientPeer:
    """The far end of a call: offers audio (a scripted mic) and a data channel to the agent,
    records the agent's audio (RMS per received frame) and messages."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = ScriptedMic()
        self.heard: list[Heard] = []
        self.messages: list[dict[str, Any]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.channel = self.pc.createDataChannel("chat")
        self.channel.on("message", self._on_message)
        self.pc.addTrack(self.mic)
        self.pc.on("track", self._on_track)

    def _on_message(self, raw: str) -> None:
        self.messages.append(json.loads(raw))

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._tasks.append(asyncio.create_task(self._listen(track)))

    async def _listen(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            x = frame.to_ndarray().astype(np.float32)  # type: ignore[union-attr]
            self.heard.append(Heard(time.monotonic(), float(np.sqrt(np.mean(x * x)))))

    async def connect(self, base_url: str) -> dict[str, Any]:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{base_url}/offer",
                json={"sdp": self.pc.localDescription.sdp, "type": self.pc.localDescription.type},
            ) as resp,
        ):
            answer = await resp.json()
            assert resp.status == 200, answer
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        return answer

    def send(self, msg: dict[str, Any]) -> None:
        self.channel.send(json.dumps(msg))

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == kind]

    async def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 20.0, after: int = 0
    ) -> dict[str, Any]:
        """The first message (from index ``after``) that satisfies ``pred``."""
        deadline = time.monotonic() + timeout
        while True:
            for m in self.messages[after:]:
                if pred(m):
                    return m
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no such message in {timeout} s; got {[m['type'] for m in self.messages]}"
                )
            await asyncio.sleep(0.01)

    def loud_since(self, t: float, threshold: float = 50.0) -> list[Heard]:
        return [h for h in self.heard if h.at >= t and h.rms > threshold]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self.mic.stop()
        await self.pc.close()


@dataclass
class Timeline:
    """Named moments of a test, for the report."""

    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str, t: float | None = None) -> float:
        self.marks[name] = time.monotonic() if t is None else t
        return self.marks[name]
