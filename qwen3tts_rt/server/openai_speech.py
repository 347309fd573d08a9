"""OpenAI-compatible ``POST /v1/audio/speech``, served over HTTP from the gRPC server's
process and event loop (off by default: ``serve --openai-port PORT``). What OpenWebUI,
LiteLLM and the ``openai`` SDK call:

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="<token or anything>")
    with client.audio.speech.with_streaming_response.create(
        model="qwen3-tts", voice="<voice id or speaker>", input="Hello!", response_format="pcm"
    ) as resp:
        for chunk in resp.iter_bytes():
            ...

Fields (JSON body):

* ``model`` (required, any name: the server speaks with the checkpoint it has loaded),
* ``input`` (required, at most ``max_synthesize_chars``),
* ``voice`` (required): a stored voice id (``CreateVoice``) or a built-in speaker; also
  OpenAI's object form ``{"id": "..."}``,
* ``instructions``: the voice description (VoiceDesign) or style (at most
  ``max_instruct_chars``),
* ``response_format``: ``mp3`` (default), ``opus`` (Ogg), ``aac`` (ADTS), ``flac``, ``wav``,
  ``pcm`` (24 kHz 16-bit little-endian mono, as OpenAI's). All at 24 kHz mono,
  encoded as generated (PyAV),
* ``speed``: only 1.0. Qwen3-TTS has no exact speed control, and time-stretching the audio
  would change the voice, so any other value is refused (400, ``param: speed``),
* ``stream_format``: ``audio`` (default: the encoded bytes, chunked as generated) or
  ``sse`` (``speech.audio.delta`` events with base64 audio, then ``speech.audio.done`` with
  the usage),
* extensions: ``language`` (a model language or ``auto``), ``non_streaming_mode`` (bool: the
  layout; default the official default of the voice, as for the other whole-text calls).

Same rules as the gRPC API: the bearer token (``--auth-token``), the limits, and errors
in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status
of the gRPC code (400, 401, 404, 429, 503, 500). Errors found before the first byte get
their status; a failure after audio has started ends the response early (``sse``: an
``error`` event first).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import av
import grpc
import numpy as np
from aiohttp import web

from qwen3tts_rt.audio import MODEL_SAMPLE_RATE, PcmEncoding, encode_pcm
from qwen3tts_rt.engine.text import has_speech
from qwen3tts_rt.errors import InvalidInputError
from qwen3tts_rt.server.errors import bounded, echo, status_for
from qwen3tts_rt.server.interceptors import bearer_matches
from qwen3tts_rt.server.runtime import OutputFormat, Runtime
from qwen3tts_rt.server.stream import AudioEvent, DoneEvent, SpeechStream
from qwen3tts_rt.v1 import tts_pb2 as pb

log = logging.getLogger(__name__)

API = "openai"
PATH = "/v1/audio/speech"
SAMPLE_RATE = MODEL_SAMPLE_RATE  # OpenAI's speech output rate is 24 kHz too
FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
# response_format -> (PyAV container format, codec)
_PYAV = {
    "mp3": ("mp3", "libmp3lame"),
    "opus": ("ogg", "libopus"),
    "aac": ("adts", "aac"),
    "flac": ("flac", "flac"),
}
MAX_FIELD_CHARS = 256  # model, voice, language, response_format ...

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.FAILED_PRECONDITION: 503,
}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    429: "rate_limit_exceeded",
}


# --------------------------------------------------------------------------- errors


class HTTPError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": bounded(str(self)),
                "type": _ERROR_TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }


def http_error(exc: BaseException) -> HTTPError:
    """The HTTP error for a domain error (same classification as the gRPC status codes)."""
    if isinstance(exc, HTTPError):
        return exc
    code, message = status_for(exc)
    status = _HTTP_STATUS.get(code, 500)
    param = exc.field if isinstance(exc, InvalidInputError) else None
    return HTTPError(status, message, param=param, code=code.name.lower())


def error_response(err: HTTPError) -> web.Response:
    return web.json_response(err.body(), status=err.status)


# --------------------------------------------------------------------------- encoders


class _Sink:
    """Write-only file object for PyAV: collects what the muxer writes (no seek, so the
    muxers write streamable output)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def write(self, data: bytes) -> int:
        self.buf += data
        return len(data)

    def take(self) -> bytes:
        out = bytes(self.buf)
        self.buf.clear()
        return out


class AudioEncoder:
    """Float samples at 24 kHz in -> bytes of ``fmt`` out, as they come (``push``), then the
    tail (``finish``). pcm and wav are written directly; the others through PyAV with a
    packet flush after every packet (Ogg pages of at most 40 ms), so the client gets
    audio while it is generated."""

    def __init__(self, fmt: str, sample_rate: int = SAMPLE_RATE) -> None:
        self.fmt = fmt
        self.rate = sample_rate
        self._header_sent = False
        self._sink: _Sink | None = None
        self._container: Any = None
        self._stream: Any = None
        if fmt in _PYAV:
            container_fmt, codec = _PYAV[fmt]
            options = {"flush_packets": "1"}
            if container_fmt == "ogg":
                options["page_duration"] = "40000"  # microseconds
            self._sink = _Sink()
            self._container = av.open(self._sink, mode="w", format=container_fmt, options=options)
            self._stream = self._container.add_stream(codec, rate=sample_rate, layout="mono")

    def _s16(self, pcm: np.ndarray) -> bytes:
        return encode_pcm(pcm, PcmEncoding.PCM_S16LE)  # the gRPC API's PCM_S16LE exactly

    def header(self) -> bytes:
        """Bytes that may go out before any audio (WAV header; the others: none)."""
        if self.fmt != "wav" or self._header_sent:
            return b""
        self._header_sent = True
        unknown = 0xFFFFFFFF  # streamed: sizes unknown (as OpenAI's streamed WAV)
        return (
            b"RIFF"
            + struct.pack("<I", unknown)
            + b"WAVE"
            + b"fmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, self.rate, self.rate * 2, 2, 16)
            + b"data"
            + struct.pack("<I", unknown)
        )

    def push(self, pcm: np.ndarray) -> bytes:
        if self.fmt in ("pcm", "wav"):
            return self.header() + self._s16(pcm)
        assert self._sink is not None
        if pcm.size:
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(pcm, dtype=np.float32)[None, :], format="flt", layout="mono"
            )
            frame.sample_rate = self.rate
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        return self._sink.take()

    def finish(self) -> bytes:
        if self.fmt in ("pcm", "wav"):
            return self.header()
        assert self._sink is not None
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return self._sink.take()

    def close(self) -> None:
        if self._container is not None:
            # already closed, or the muxer failed: nothing to keep
            with contextlib.suppress(Exception):
                self._container.close()


# --------------------------------------------------------------------------- request


@dataclass(frozen=True)
class SpeechRequest:
    model: str
    input: str
    voice: str
    instructions: str
    response_format: str
    stream_format: str
    language: str
    non_streaming_mode: bool | None


def _string(body: dict[str, Any], name: str, *, required: bool = False, limit: int = MAX_FIELD_CHARS) -> str:
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidInputError("is required", field=name)
        return ""
    if not isinstance(value, str):
        raise InvalidInputError(f"must be a string, got {type(value).__name__}", field=name)
    if len(value) > limit:
        raise InvalidInputError(f"has {len(value)} characters; at most {limit}", field=name)
    return value


def parse_request(body: Any, *, max_input_chars: int, max_instruct_chars: int) -> SpeechRequest:
    """The request's fields, checked (raises ``InvalidInputError`` naming the field)."""
    if not isinstance(body, dict):
        raise InvalidInputError("the body must be a JSON object", field="body")
    model = _string(body, "model", required=True)
    if not model.strip():
        raise InvalidInputError(
            "is empty; name a model (any name: this server speaks with its own)", field="model"
        )
    text = _string(body, "input", required=True, limit=max_input_chars)
    if not has_speech(text):
        raise InvalidInputError(
            "is empty: there is nothing to say (only whitespace or control characters)", field="input"
        )
    voice_value = body.get("voice")
    if isinstance(voice_value, dict):  # OpenAI's custom-voice form {"id": "..."}
        voice = _string(voice_value, "id", required=True)
    else:
        voice = _string(body, "voice", required=True)
    if not voice.strip():
        raise InvalidInputError("is empty; pass a stored voice id or a built-in speaker", field="voice")
    instructions = _string(body, "instructions", limit=max_instruct_chars)
    fmt = _string(body, "response_format") or "mp3"
    if fmt not in FORMATS:
        raise InvalidInputError(
            f"{echo(fmt)} is not supported; use one of {', '.join(FORMATS)}", field="response_format"
        )
    stream_format = _string(body, "stream_format") or "audio"
    if stream_format not in ("audio", "sse"):
        raise InvalidInputError(
            f"{echo(stream_format)} is not supported; use audio or sse", field="stream_format"
        )
    speed = body.get("speed", 1.0)
    if isinstance(speed, bool) or not isinstance(speed, (int, float)):
        raise InvalidInputError("must be a number", field="speed")
    if speed != 1.0:
        raise InvalidInputError(
            f"{speed} is not supported: only 1.0. Qwen3-TTS has no exact speed control, and "
            "time-stretching the audio would change the voice",
            field="speed",
        )
    language = _string(body, "language") or "auto"
    nsm = body.get("non_streaming_mode")
    if nsm is not None and not isinstance(nsm, bool):
        raise InvalidInputError("must be true or false", field="non_streaming_mode")
    return SpeechRequest(model, text, voice.strip(), instructions, fmt, stream_format, language, nsm)


# --------------------------------------------------------------------------- server


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class OpenAISpeechServer:
    """The HTTP endpoint on the running event loop: ``await start()``, ``await stop()``."""

    def __init__(self, runtime: Runtime, host: str, port: int) -> None:
        self.rt = runtime
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        cfg = runtime.config
        # body: the input and instructions as JSON (escaped: up to 6 bytes a character) and the rest
        self.max_body_bytes = 6 * (cfg.max_synthesize_chars + cfg.max_instruct_chars) + 64 * 1024

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._errors, self._auth])
        app.router.add_post(PATH, self.speech)
        return app

    async def start(self) -> int:
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.requested_port, reuse_port=False)
        await site.start()
        self._runner = runner
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.requested_port
        log.info("OpenAI speech endpoint on http://%s:%s%s", self.host, self.port, PATH)
        return self.port

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop listening; requests in flight get ``grace_s`` to finish. Safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            # aiohttp takes the handlers' grace at construction only; the drain decides it now
            if hasattr(runner, "_shutdown_timeout"):
                runner._shutdown_timeout = grace_s
            await runner.cleanup()

    # ------------------------------------------------------------------ middlewares

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as e:  # aiohttp's own (404, 405, 413): OpenAI's shape
            if e.status < 400:
                raise
            return error_response(HTTPError(e.status, e.reason, code=str(e.status)))
        except Exception as e:
            err = http_error(e)
            if err.status == 500:
                log.exception("%s %s failed", request.method, request.path)
            return error_response(err)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        token = self.rt.config.auth_token
        if token is not None and not bearer_matches(request.headers.get("Authorization"), token):
            raise HTTPError(
                401,
                "missing or wrong bearer token: send 'Authorization: Bearer <token>' (the server's --auth-token)",
                code="invalid_api_key",
            )
        return await handler(request)

    # ------------------------------------------------------------------ handler

    async def speech(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        rt, cfg = self.rt, self.rt.config
        rt.check_ready()
        try:
            body = await request.json()
        except web.HTTPRequestEntityTooLarge:
            raise
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidInputError(f"is not valid JSON ({e})", field="body") from None
        req = parse_request(
            body, max_input_chars=cfg.max_synthesize_chars, max_instruct_chars=cfg.max_instruct_chars
        )
        rt.check_instruct(req.instructions, field="instructions")
        voice = await rt.named_voice(req.voice, field="voice", instruct=req.instructions or None)
        non_streaming = req.non_streaming_mode
        if non_streaming is None:
            non_streaming = rt.official_non_streaming_default(voice)
        params = rt.sampling(pb.SamplingParams(), prefix="")
        session = rt.open_session(
            voice, req.language, params, seed=None, non_streaming_mode=non_streaming, prefix=""
        )
        stream = SpeechStream(
            session, OutputFormat(SAMPLE_RATE, PcmEncoding.FLOAT32_LE), api=API, started_at=started
        )
        encoder: AudioEncoder | None = None
        resp: web.StreamResponse | None = None
        try:
            encoder = AudioEncoder(req.response_format)
            stream.text(req.input)
            stream.end()
            sse = req.stream_format == "sse"
            resp = web.StreamResponse(
                status=200,
                headers={
                    "Content-Type": "text/event-stream" if sse else CONTENT_TYPES[req.response_format],
                    "Cache-Control": "no-cache",
                },
            )
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            frames = 0

            async def send(data: bytes) -> None:
                if not data:
                    return
                assert resp is not None
                if sse:
                    event = {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}
                    await resp.write(f"data: {json.dumps(event)}\n\n".encode())
                else:
                    await resp.write(data)

            await send(encoder.header())
            try:
                async for ev in stream.events():
                    if isinstance(ev, AudioEvent):
                        if ev.samples:
                            await send(encoder.push(np.frombuffer(ev.data, dtype="<f4")))
                    elif isinstance(ev, DoneEvent):
                        frames += ev.done.frames
                await send(encoder.finish())
            except Exception as e:
                if sse:  # the status is sent: say why in the stream, then end it
                    err = http_error(e)
                    if err.status == 500:
                        log.exception("%s failed mid-stream", PATH)
                    await resp.write(f"data: {json.dumps({'type': 'error', **err.body()})}\n\n".encode())
                    return resp
                raise
            if sse:
                tokens = len(rt.checkpoint.tokenizer.encode(req.input))
                usage = {"input_tokens": tokens, "output_tokens": frames, "total_tokens": tokens + frames}
                await resp.write(
                    f"data: {json.dumps({'type': 'speech.audio.done', 'usage': usage})}\n\n".encode()
                )
            await resp.write_eof()
            return resp
        except Exception:
            if resp is not None and resp.prepared:
                # headers are out: the client sees the response end early (no final chunk)
                log.warning("%s: response ended early", PATH, exc_info=True)
                if request.transport is not None:
                    request.transport.close()
                return resp
            raise
        finally:
            stream.close()
            if encoder is not None:
                encoder.close()
