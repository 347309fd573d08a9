"""LiveKit Agents TTS for a qwen3tts-rt server (``pip install qwen3tts-rt[livekit]``).

A minimal agent (any STT/LLM/VAD plugins; run with ``python agent.py dev``)::

    from livekit.agents import Agent, AgentSession, JobContext, WorkerOptions, cli
    from qwen3tts_rt.integrations import livekit as qwen3tts

    async def entrypoint(ctx: JobContext) -> None:
        await ctx.connect()
        session = AgentSession(
            stt=..., llm=..., vad=...,
            tts=qwen3tts.TTS(address="127.0.0.1:50051", voice="vivian", language="en"),
        )
        await session.start(agent=Agent(instructions="You are a helpful voice assistant."), room=ctx.room)

    if __name__ == "__main__":
        cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint))

Mapping onto the server's ``StreamSynthesize``:

* ``TTS(streaming=True)``: ``stream()`` gives a ``SynthesizeStream`` that sends each
  ``push_text`` at once (one LLM token each, no sentence tokenizer); its text is a named
  utterance (``BeginUtterance{key}``), ``flush()`` / ``end_input()`` end it (``Flush``).
  Audio, progress and the end of the utterance come back tagged with the key.
* ``synthesize(text)`` gives a ``ChunkedStream``: one utterance with the whole text.
* ``aclose()`` of a stream mid-reply sends ``Cancel{key}``: the server stops within one
  frame and drops the queued audio (the stream itself, shared, goes on).
* **Connection reuse.** One gRPC channel per ``TTS``; long-lived ``StreamSynthesize`` calls
  on it are kept in a ``ConnectionPool``, one per concurrent synthesis (LiveKit may
  overlap a new reply with the end of the previous one), so a reply costs no stream
  setup. A pooled stream is reused while it was last taken less than ``idle_reuse_s``
  ago (default 240 s, under the server's 300 s ``--stream-idle-timeout``); an older one
  is closed and a fresh one opened. ``prewarm()`` opens one ahead of the first reply.
* ``update_options(voice=, language=, instruct=)`` applies to the next utterance
  (per-utterance options: no reconnect).
* Any ``sample_rate``: the server produces 8, 11.025, 12, 16, 22.05, 24, 32, 44.1, 48 kHz
  directly; any other rate is resampled here from 24 kHz.
* Aligned transcript: words with start/end times from the server's ``Progress`` (when
  the talker had read them; see ``WordTimer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, replace
from typing import Any

import grpc
from livekit import rtc
from livekit.agents import (
    DEFAULT_API_CONNECT_OPTIONS,
    APIConnectionError,
    APIConnectOptions,
    APIStatusError,
    APITimeoutError,
    tts,
    utils,
)
from livekit.agents.types import NOT_GIVEN, NotGivenOr, TimedString
from livekit.agents.utils import is_given

from qwen3tts_rt.integrations.link import (
    MODEL_SAMPLE_RATE,
    LinkClosed,
    ServerFacts,
    SpeechLink,
    WordTimer,
    auth_metadata,
    model_language,
    open_channel,
    server_facts,
    stream_config,
    voice_options,
)
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_STATUS = {  # gRPC code -> HTTP-like status for APIStatusError (retryable: 5xx)
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


@dataclass
class _Options:
    voice: str | None
    language: str
    instruct: str | None
    seed: int | None


def _api_error(e: BaseException) -> Exception:
    if isinstance(e, LinkClosed) and e.status is not None and e.status in _STATUS:
        return APIStatusError(str(e), status_code=_STATUS[e.status], body=None)
    if isinstance(e, grpc.aio.AioRpcError):
        status = _STATUS.get(e.code(), 500)
        return APIStatusError(f"{e.code().name}: {e.details()}", status_code=status, body=None)
    return APIConnectionError(str(e))


class TTS(tts.TTS):
    """LiveKit Agents TTS over a qwen3tts-rt server (see the module docstring)."""

    def __init__(
        self,
        *,
        address: str = "127.0.0.1:50051",
        voice: str | None = None,
        language: str = "auto",
        instruct: str | None = None,
        sample_rate: int = MODEL_SAMPLE_RATE,
        seed: int | None = None,
        auth_token: str | None = None,
        secure: bool = False,
        root_certificates: bytes | None = None,
        idle_reuse_s: float = 240.0,
        cancel_wait_s: float = 5.0,
    ) -> None:
        """
        Args:
            address: ``host:port`` of the qwen3tts-rt gRPC server.
            voice: a built-in speaker (CustomVoice) or a stored voice id (``CreateVoice``);
                None: the server's default.
            language: ``en``, ``en-US``, a model language name, or ``auto``.
            instruct: voice description (VoiceDesign) or style.
            sample_rate: output rate (any; see the module docstring).
            seed: reproducible sampling.
            auth_token: the server's ``--auth-token``.
            secure: TLS (with ``root_certificates``, else the system roots).
            idle_reuse_s: a pooled stream last taken longer ago than this is replaced.
            cancel_wait_s: after a cancel, how long a stream may take to confirm it before
                it is closed instead of returned to the pool.
        """
        if sample_rate <= 0:
            raise ValueError("sample_rate must be positive")
        if idle_reuse_s <= 0 or cancel_wait_s <= 0:
            raise ValueError("idle_reuse_s and cancel_wait_s must be > 0")
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=True, aligned_transcript=True),
            sample_rate=sample_rate,
            num_channels=1,
        )
        self._opts = _Options(voice, language, instruct, seed)
        self._address = address
        self._metadata = auth_metadata(auth_token)
        self._secure = secure
        self._root_certificates = root_certificates
        self._cancel_wait_s = cancel_wait_s
        self._channel: Any = None
        self._stub: pb_grpc.TextToSpeechStub | None = None
        self._facts: ServerFacts | None = None
        self._facts_lock = asyncio.Lock()
        self._pool = utils.ConnectionPool[SpeechLink](
            connect_cb=self._connect_link,
            close_cb=self._close_link,
            max_session_duration=idle_reuse_s,
            mark_refreshed_on_get=True,
        )
        self._keys = 0

    @property
    def model(self) -> str:
        return self._facts.model_id if self._facts and self._facts.model_id else "qwen3-tts"

    @property
    def provider(self) -> str:
        return "qwen3tts-rt"

    # ------------------------------------------------------------------ connection

    def _stub_now(self) -> pb_grpc.TextToSpeechStub:
        if self._stub is None:
            self._channel = open_channel(
                self._address, secure=self._secure, root_certificates=self._root_certificates
            )
            self._stub = pb_grpc.TextToSpeechStub(self._channel)
        return self._stub

    async def _server(self, timeout: float) -> ServerFacts:
        async with self._facts_lock:
            if self._facts is None:
                self._facts = await server_facts(self._stub_now(), self._metadata, timeout)
            return self._facts

    @property
    def server_rate(self) -> int:
        """The rate asked of the server: ours when it produces it, else 24 kHz."""
        if self._facts is not None and self.sample_rate in self._facts.sample_rates:
            return self.sample_rate
        return MODEL_SAMPLE_RATE

    async def _connect_link(self, timeout: float) -> SpeechLink:
        facts = await self._server(timeout)
        o = self._opts
        cfg = stream_config(
            o.voice,
            facts,
            language=model_language(o.language, facts),
            instruct=o.instruct,
            sample_rate=self.server_rate,
            seed=o.seed,
        )
        return await SpeechLink(self._stub_now(), cfg, self._metadata).open()

    async def _close_link(self, link: SpeechLink) -> None:
        await link.close()

    async def _acquire(self, timeout: float) -> SpeechLink:
        while True:
            link = await self._pool.get(timeout=timeout)
            if not link.closed:
                return link
            self._pool.remove(link)  # the server ended it (idle timeout, restart): a new one

    def _release(self, link: SpeechLink, *, ok: bool) -> None:
        if ok and not link.closed:
            self._pool.put(link)
        else:
            self._pool.remove(link)

    def _next_key(self) -> str:
        self._keys += 1
        return f"lk-{utils.shortuuid()}-{self._keys}"

    def _options(self) -> pb.UtteranceOptions:
        o = self._opts
        return voice_options(
            o.voice, self._facts, language=model_language(o.language, self._facts), instruct=o.instruct or ""
        )

    # ------------------------------------------------------------------ public

    def update_options(
        self,
        *,
        voice: NotGivenOr[str | None] = NOT_GIVEN,
        language: NotGivenOr[str] = NOT_GIVEN,
        instruct: NotGivenOr[str | None] = NOT_GIVEN,
    ) -> None:
        """New settings for the next utterance (streams in flight keep theirs)."""
        o = self._opts
        self._opts = replace(
            o,
            voice=voice if is_given(voice) else o.voice,
            language=language if is_given(language) else o.language,
            instruct=instruct if is_given(instruct) else o.instruct,
        )

    def prewarm(self) -> None:
        self._pool.prewarm()

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> ChunkedStream:
        return ChunkedStream(tts=self, input_text=text, conn_options=conn_options)

    def stream(self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> SynthesizeStream:
        return SynthesizeStream(tts=self, conn_options=conn_options)

    async def aclose(self) -> None:
        await self._pool.aclose()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None


class _Speaker:
    """One synthesis on a pooled link: the utterances named ``key``, their audio into an
    ``AudioEmitter`` (resampled when the server cannot produce the rate), their words as
    timed transcripts, and the cancel-on-close."""

    def __init__(self, tts_: TTS, link: SpeechLink, emitter: tts.AudioEmitter, *, streaming: bool) -> None:
        self.tts = tts_
        self.link = link
        self.emitter = emitter
        self.streaming = streaming
        self.key = tts_._next_key()
        self.queue = link.subscribe(self.key)
        self.begun = 0  # utterances begun
        self.done = 0  # utterances ended
        self.input_done = False
        self.words: list[WordTimer] = []
        self.segment: int | None = None  # utterance id whose segment is open
        self.rate_in = tts_.server_rate
        self._resampler: rtc.AudioResampler | None = None
        self._word_end = 0.0

    # input side
    def begin(self) -> None:
        self.link.begin(self.key, self.tts._options())
        self.begun += 1
        self.words.append(WordTimer(lag=0))

    def text(self, delta: str) -> None:
        self.words[-1].text += delta
        self.link.text(delta)

    def flush(self) -> None:
        self.link.flush()

    def end_input(self) -> None:
        self.input_done = True
        self.queue.put_nowait(pb.StreamResponse())  # wakes ``run`` to check whether it is over

    # output side
    def _push(self, data: bytes) -> None:
        if self.rate_in == self.tts.sample_rate:
            self.emitter.push(data)
            return
        if self._resampler is None:
            self._resampler = rtc.AudioResampler(self.rate_in, self.tts.sample_rate, num_channels=1)
        for frame in self._resampler.push(bytearray(data)):
            self.emitter.push(frame.data.tobytes())

    def _end_audio(self) -> None:
        if self._resampler is not None:
            for frame in self._resampler.flush():
                self.emitter.push(frame.data.tobytes())
            self._resampler = None

    def _open_segment(self, uid: int) -> None:
        if self.streaming and self.segment != uid:
            self.emitter.start_segment(segment_id=f"{self.key}-{uid}")
            self.segment = uid
            self._word_end = 0.0

    def _words(self, index: int, chars: int, seconds: float, *, done: bool = False) -> None:
        if not 0 <= index < len(self.words):
            return
        for word, t in self.words[index].due(chars, seconds, done=done):
            start = min(self._word_end, t)
            self.emitter.push_timed_transcript(TimedString(text=word + " ", start_time=start, end_time=t))
            self._word_end = t

    async def run(self) -> None:
        """Write the responses out until every utterance begun has ended and the input is over."""
        order: dict[int, int] = {}  # utterance id -> index of its text in ``words``
        while not (self.input_done and self.done >= self.begun):
            item = await self.queue.get()
            if isinstance(item, LinkClosed):
                raise _api_error(item)
            kind = item.WhichOneof("response")
            if kind is None:
                continue
            if kind == "audio":
                uid = item.audio.utterance_id
                order.setdefault(uid, len(order))
                self._open_segment(uid)
                self._push(item.audio.audio)
            elif kind == "progress":
                uid = item.progress.utterance_id
                order.setdefault(uid, len(order))
                self._open_segment(uid)
                self._words(
                    order[uid], item.progress.chars_consumed, item.progress.sample_offset / self.rate_in
                )
            elif kind == "utterance_done":
                d = item.utterance_done
                order.setdefault(d.utterance_id, len(order))
                self.done += 1
                if d.reason == pb.UtteranceDone.CANCELLED:
                    continue
                self._open_segment(d.utterance_id)
                self._end_audio()
                idx = order[d.utterance_id]
                if 0 <= idx < len(self.words):
                    self._words(idx, len(self.words[idx].text), d.audio_seconds, done=True)
                if self.streaming:
                    self.emitter.end_segment()
                    self.segment = None

    def finish(self, *, complete: bool) -> None:
        """After ``run`` (complete) or when the synthesis was closed or failed: cancel what
        is still speaking and give the link back once the server confirmed the cancel."""
        if complete or self.link.closed:
            self.link.unsubscribe(self.key)
            self.tts._release(self.link, ok=complete)
            return
        self.link.cancel(self.key)
        asyncio.get_running_loop().create_task(self._return_after_cancel())

    async def _return_after_cancel(self) -> None:
        async def confirmed() -> bool:
            while self.done < self.begun:
                item = await self.queue.get()
                if isinstance(item, LinkClosed):
                    return False
                if item.WhichOneof("response") == "utterance_done":
                    self.done += 1
            return True

        ok = False
        with contextlib.suppress(asyncio.TimeoutError):
            ok = await asyncio.wait_for(confirmed(), self.tts._cancel_wait_s)
        self.link.unsubscribe(self.key)
        self.tts._release(self.link, ok=ok)


class ChunkedStream(tts.ChunkedStream):
    """``synthesize(text)``: one utterance with the whole text."""

    def __init__(self, *, tts: TTS, input_text: str, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, input_text=input_text, conn_options=conn_options)
        self._qtts = tts

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        output_emitter.initialize(
            request_id=utils.shortuuid(),
            sample_rate=self._qtts.sample_rate,
            num_channels=1,
            mime_type="audio/pcm",
        )
        try:
            link = await self._qtts._acquire(self._conn_options.timeout)
        except asyncio.TimeoutError as e:
            raise APITimeoutError() from e
        except Exception as e:
            raise _api_error(e) from e
        sp = _Speaker(self._qtts, link, output_emitter, streaming=False)
        complete = False
        try:
            sp.begin()
            sp.text(self._input_text)
            sp.flush()
            sp.end_input()
            await sp.run()
            complete = True
        except LinkClosed as e:
            raise _api_error(e) from e
        finally:
            sp.finish(complete=complete)


class SynthesizeStream(tts.SynthesizeStream):
    """``stream()``: ``push_text`` per token, ``flush``/``end_input`` end the utterance."""

    def __init__(self, *, tts: TTS, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, conn_options=conn_options)
        self._qtts = tts

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        output_emitter.initialize(
            request_id=utils.shortuuid(),
            sample_rate=self._qtts.sample_rate,
            num_channels=1,
            mime_type="audio/pcm",
            stream=True,
        )
        try:
            link = await self._qtts._acquire(self._conn_options.timeout)
        except asyncio.TimeoutError as e:
            raise APITimeoutError() from e
        except Exception as e:
            raise _api_error(e) from e
        sp = _Speaker(self._qtts, link, output_emitter, streaming=True)

        async def send() -> None:
            open_ = False
            try:
                async for data in self._input_ch:
                    if isinstance(data, self._FlushSentinel):
                        if open_:
                            sp.flush()
                            open_ = False
                        continue
                    if not open_:
                        sp.begin()
                        open_ = True
                    self._mark_started()
                    sp.text(data)
                if open_:
                    sp.flush()
                sp.end_input()
            except LinkClosed as e:  # the stream ended under us: ``run`` raises it
                sp.queue.put_nowait(e)

        complete = False
        sender = asyncio.create_task(send(), name="qwen3tts-send")
        try:
            await sp.run()
            await sender
            complete = True
        except LinkClosed as e:
            raise _api_error(e) from e
        finally:
            if not sender.done():
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sender
            sp.finish(complete=complete)


__all__ = ["TTS", "ChunkedStream", "SynthesizeStream"]
