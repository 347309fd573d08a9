"""The connection both framework plugins share: a gRPC channel to a qwen3tts-rt server
and long-lived ``StreamSynthesize`` calls on it that carry named utterances.

A ``SpeechLink`` is one ``StreamSynthesize`` call. Requests (``begin``, ``text``,
``flush``, ``cancel``) are queued without waiting; responses are handed to the
subscriber of their utterance key (``subscribe(key)``) or to a catch-all subscriber
(``subscribe(ALL)``). When the call ends (server idle timeout, max stream duration,
shutdown, a network error) every subscriber gets a ``LinkClosed`` and ``closed`` is
set; the plugins then open a new link on the same channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_WORD = re.compile(r"\S+")
ALL = "*"  # subscribe to every response (a plugin with one consumer)
MODEL_SAMPLE_RATE = 24000

# BCP-47 primary subtags (what frameworks pass: "en", "en-US", Language.EN) -> model languages
LANGUAGES = {
    "en": "english",
    "zh": "chinese",
    "de": "german",
    "es": "spanish",
    "ja": "japanese",
    "fr": "french",
    "ko": "korean",
    "ru": "russian",
    "it": "italian",
    "pt": "portuguese",
}


class LinkClosed(Exception):
    """The ``StreamSynthesize`` call of a link ended; ``status`` is its gRPC code, if any."""

    def __init__(self, message: str, status: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServerFacts:
    """What a plugin needs to know about the server (``GetServerInfo``, asked once)."""

    speakers: frozenset[str]
    languages: tuple[str, ...]
    sample_rates: tuple[int, ...]
    model_id: str = ""


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def open_channel(
    address: str, *, secure: bool = False, root_certificates: bytes | None = None
) -> grpc.aio.Channel:
    """One channel (one HTTP/2 connection, reconnected by gRPC) per plugin instance."""
    if secure:
        return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(root_certificates))
    return grpc.aio.insecure_channel(address)


async def server_facts(
    stub: pb_grpc.TextToSpeechStub, metadata: tuple[tuple[str, str], ...], timeout: float = 30.0
) -> ServerFacts:
    info = await stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=metadata, timeout=timeout)
    return ServerFacts(
        speakers=frozenset(s.lower() for s in info.speakers),
        languages=tuple(info.languages),
        sample_rates=tuple(info.sample_rates_hz),
        model_id=info.model_id,
    )


def model_language(language: Any, facts: ServerFacts | None = None) -> str:
    """A framework language (``"en-US"``, ``"en"``, ``Language.EN``, ``"english"``, ``None``)
    -> a model language name, or ``"auto"`` (unknown languages are left to the model's
    detection, with a log line)."""
    if language is None:
        return "auto"
    code = str(getattr(language, "value", language)).strip().lower().replace("_", "-")
    if code in ("", "auto"):
        return "auto"
    if facts is not None and code in facts.languages:
        return code
    name = LANGUAGES.get(code.split("-")[0])
    if name is None and code in LANGUAGES.values():
        name = code
    if name is None or (facts is not None and facts.languages and name not in facts.languages):
        log.warning("language %r is not one of the model's; the model detects the language", language)
        return "auto"
    return name


def voice_options(
    voice: str | None, facts: ServerFacts | None, *, language: str | None = None, instruct: str | None = None
) -> pb.UtteranceOptions:
    """Per-utterance options: ``voice`` is a built-in speaker (when the server lists it) or
    a stored voice id."""
    opts = pb.UtteranceOptions()
    if voice:
        if facts is not None and voice.lower() in facts.speakers:
            opts.speaker = voice.lower()
        else:
            opts.voice_id = voice
    if language is not None:
        opts.language = language
    if instruct is not None:
        opts.instruct = instruct
    return opts


def stream_config(
    voice: str | None,
    facts: ServerFacts | None,
    *,
    language: str = "auto",
    instruct: str | None = None,
    sample_rate: int = MODEL_SAMPLE_RATE,
    seed: int | None = None,
) -> pb.StreamConfig:
    cfg = pb.StreamConfig(language=language, sample_rate_hz=sample_rate, encoding=pb.PCM_S16LE)
    opts = voice_options(voice, facts)
    if opts.HasField("speaker"):
        cfg.speaker = opts.speaker
    elif opts.HasField("voice_id"):
        cfg.voice_id = opts.voice_id
    if instruct:
        cfg.instruct = instruct
    if seed is not None:
        cfg.seed = seed
    return cfg


def response_key(resp: pb.StreamResponse) -> str:
    kind = resp.WhichOneof("response")
    if kind == "audio":
        return resp.audio.key
    if kind == "progress":
        return resp.progress.key
    if kind == "utterance_done":
        return resp.utterance_done.key
    return ""


class WordTimer:
    """Word timing of one utterance from its text (as sent) and the server's ``Progress``:
    a word is due when the talker has read ``lag`` words past it (speech lags reading),
    at the audio time of that progress; every word left is due when the utterance ends."""

    def __init__(self, lag: int) -> None:
        self.text = ""
        self.lag = lag
        self.sent = 0  # words reported so far
        self.seconds = 0.0  # audio time of the latest progress

    def due(self, chars_read: int, seconds: float, *, done: bool = False) -> list[tuple[str, float]]:
        """Words to report now: those followed by ``lag`` words the talker has read (all
        of them when the utterance is done)."""
        self.seconds = seconds
        words = list(_WORD.finditer(self.text))
        if done:
            ready = len(words)
        else:
            # a word is read when the text read so far covers it and something follows it
            read = sum(1 for m in words if m.end() <= chars_read and m.end() < len(self.text))
            ready = max(read - self.lag, 0)
        out = [(m.group(), seconds) for m in words[self.sent : ready]]
        self.sent = max(self.sent, ready)
        return out


Item = pb.StreamResponse | LinkClosed


class SpeechLink:
    """One long-lived ``StreamSynthesize`` call (see the module docstring)."""

    def __init__(
        self,
        stub: pb_grpc.TextToSpeechStub,
        config: pb.StreamConfig,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self._stub = stub
        self.config = config
        self._metadata = metadata
        self._requests: asyncio.Queue[pb.StreamRequest | None] = asyncio.Queue()
        self._subs: dict[str, asyncio.Queue[Item]] = {}
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self.closed = False
        self.error: LinkClosed | None = None

    async def open(self) -> SpeechLink:
        self._call = self._stub.StreamSynthesize(self._request_iter(), metadata=self._metadata)
        self._reader = asyncio.create_task(self._read(), name="qwen3tts-link-reader")
        return self

    async def _request_iter(self) -> AsyncIterator[pb.StreamRequest]:
        yield pb.StreamRequest(config=self.config)
        while True:
            req = await self._requests.get()
            if req is None:
                return
            yield req

    async def _read(self) -> None:
        error = LinkClosed("the stream ended")
        try:
            async for resp in self._call:
                q = self._subs.get(response_key(resp)) or self._subs.get(ALL)
                if q is not None:
                    q.put_nowait(resp)
        except asyncio.CancelledError:
            error = LinkClosed("the stream was closed by the client", grpc.StatusCode.CANCELLED)
        except grpc.aio.AioRpcError as e:
            error = LinkClosed(f"{e.code().name}: {e.details()}", e.code())
        except Exception as e:  # the channel broke in some other way
            error = LinkClosed(f"{type(e).__name__}: {e}")
        finally:
            self.closed = True
            self.error = error
            for q in self._subs.values():
                q.put_nowait(error)

    # ------------------------------------------------------------------ subscribers

    def subscribe(self, key: str) -> asyncio.Queue[Item]:
        """The queue that gets the responses of utterances named ``key`` (``ALL``: every
        response no other subscriber takes). Subscribe before ``begin``."""
        q: asyncio.Queue[Item] = asyncio.Queue()
        if self.closed:
            q.put_nowait(self.error or LinkClosed("the stream ended"))
        self._subs[key] = q
        return q

    def unsubscribe(self, key: str) -> None:
        self._subs.pop(key, None)

    # ------------------------------------------------------------------ requests

    def _send(self, req: pb.StreamRequest) -> None:
        if self.closed:
            raise self.error or LinkClosed("the stream ended")
        self._requests.put_nowait(req)

    def begin(self, key: str, options: pb.UtteranceOptions | None = None) -> None:
        self._send(pb.StreamRequest(begin=pb.BeginUtterance(key=key, options=options)))

    def text(self, delta: str) -> None:
        if delta:
            self._send(pb.StreamRequest(text=delta))

    def flush(self, client_id: str = "") -> None:
        self._send(pb.StreamRequest(flush=pb.Flush(client_id=client_id)))

    def cancel(self, key: str = "") -> None:
        """In-band cancel of the utterances named ``key`` (``""``: all of them)."""
        if not self.closed:
            self._requests.put_nowait(pb.StreamRequest(cancel=pb.Cancel(key=key)))

    async def close(self) -> None:
        """End the call now (the server frees the session). Safe to call twice."""
        self._requests.put_nowait(None)
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
