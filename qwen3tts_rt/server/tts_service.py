"""``qwen3tts_rt.v1.TextToSpeech``: thin async handlers over the runtime and the engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import grpc

from qwen3tts_rt import __version__
from qwen3tts_rt.audio import SUPPORTED_OUTPUT_RATES
from qwen3tts_rt.engine.text import has_speech
from qwen3tts_rt.errors import InvalidInputError, TimeLimitError
from qwen3tts_rt.server.errors import grpc_errors
from qwen3tts_rt.server.runtime import Runtime, packet_defaults
from qwen3tts_rt.server.stream import AudioEvent, DoneEvent, ProgressEvent, SpeechStream
from qwen3tts_rt.server.voice_store import VoiceRecord
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

API = "tts"
REASONS = {"eos": pb.UtteranceDone.EOS, "cap": pb.UtteranceDone.CAP, "cancelled": pb.UtteranceDone.CANCELLED}


def voice_message(rec: VoiceRecord) -> pb.Voice:
    return pb.Voice(
        voice_id=rec.voice_id,
        display_name=rec.display_name,
        x_vector_only=rec.x_vector_only,
        ref_text=rec.ref_text,
        ref_audio_seconds=rec.ref_audio_seconds,
        created_unix_ms=rec.created_unix_ms,
        notes=rec.notes,
    )


def _done_message(ev: DoneEvent) -> pb.UtteranceDone:
    d = ev.done
    return pb.UtteranceDone(
        utterance_id=d.utterance_id,
        reason=REASONS.get(d.reason, pb.UtteranceDone.REASON_UNSPECIFIED),
        frames=d.frames,
        audio_seconds=d.audio_seconds,
        first_packet_latency_ms=(ev.first_packet_latency_s or 0.0) * 1000.0,
        real_time_factor=d.rtf or 0.0,
        client_id=d.client_id,
        key=d.key,
    )


class _Activity:
    """When the stream last saw a request or wrote a response (for the idle rule)."""

    def __init__(self) -> None:
        self.at = time.monotonic()

    def touch(self) -> None:
        self.at = time.monotonic()


async def _read_requests(
    requests: AsyncIterator[pb.StreamRequest], stream: SpeechStream, rt: Runtime, activity: _Activity
) -> None:
    """The reader task of StreamSynthesize: applies begins, deltas, flushes and cancels
    in order as they arrive; the end of the client's stream means end of text."""
    try:
        async for req in requests:
            activity.touch()
            kind = req.WhichOneof("request")
            if kind == "text":
                stream.text(req.text)
            elif kind == "begin":
                rt.check_key(req.begin.key, field="begin.key")
                options = await rt.utterance_options(req.begin.options, stream.session)
                stream.begin(req.begin.key, options)
            elif kind == "flush":
                rt.check_key(req.flush.client_id, field="flush.client_id")
                stream.flush(req.flush.client_id)
            elif kind == "cancel":
                rt.check_key(req.cancel.key, field="cancel.key")
                stream.cancel(req.cancel.key or None)
            elif kind == "config":
                raise InvalidInputError(
                    "sent again; config must be sent exactly once, as the first message", field="config"
                )
            else:
                raise InvalidInputError(
                    "empty message: set one of config, begin, text, flush, cancel", field="request"
                )
        stream.end()
    except asyncio.CancelledError:
        raise
    except Exception as e:  # a broken rule, or the client's side failed
        stream.fail(e)


async def _watch_time_limits(stream: SpeechStream, rt: Runtime, activity: _Activity, started: float) -> None:
    """Ends a stream that neither sent nor received anything for stream_idle_timeout_s,
    or that has been open for max_stream_duration_s (DEADLINE_EXCEEDED)."""
    cfg = rt.config
    end_at = started + cfg.max_stream_duration_s
    while True:
        now = time.monotonic()
        idle_until = activity.at + cfg.stream_idle_timeout_s
        if now >= end_at:
            stream.fail(
                TimeLimitError(
                    f"the stream was open for {cfg.max_stream_duration_s:g} s (max_stream_duration_s); "
                    "open a new stream"
                )
            )
            return
        if now >= idle_until:
            stream.fail(
                TimeLimitError(
                    f"nothing was sent or received for {cfg.stream_idle_timeout_s:g} s "
                    "(stream_idle_timeout_s); open a new stream when there is text to speak"
                )
            )
            return
        await asyncio.sleep(min(end_at, idle_until) - now + 0.01)


class TextToSpeechServicer(pb_grpc.TextToSpeechServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    @grpc_errors
    async def StreamSynthesize(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        started = time.perf_counter()
        self.rt.check_ready()
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            raise InvalidInputError(
                "missing: the stream ended before its first message, which must be config", field="config"
            ) from None
        kind = first.WhichOneof("request")
        if kind != "config":
            what = f"{kind} arrived before config" if kind else "the first message is empty"
            raise InvalidInputError(f"{what}; the first message of a stream must be config", field="config")
        session, fmt = await self.rt.session_from_config(first.config, whole_text=False)
        stream = SpeechStream(session, fmt, api=API, started_at=started)
        activity = _Activity()
        reader = asyncio.create_task(
            _read_requests(requests, stream, self.rt, activity), name="stream-reader"
        )
        watchdog = asyncio.create_task(
            _watch_time_limits(stream, self.rt, activity, time.monotonic()), name="stream-watchdog"
        )
        try:
            async for ev in stream.events():
                activity.touch()
                if isinstance(ev, AudioEvent):
                    if ev.samples:
                        yield pb.StreamResponse(
                            audio=pb.AudioChunk(
                                audio=ev.data,
                                sequence_number=ev.seq,
                                sample_offset=ev.sample_offset,
                                utterance_id=ev.utterance_id,
                                key=ev.key,
                            )
                        )
                elif isinstance(ev, ProgressEvent):
                    yield pb.StreamResponse(
                        progress=pb.Progress(
                            utterance_id=ev.utterance_id,
                            chars_consumed=ev.chars_consumed,
                            key=ev.key,
                            sample_offset=ev.sample_offset,
                        )
                    )
                elif isinstance(ev, DoneEvent):
                    yield pb.StreamResponse(utterance_done=_done_message(ev))
        finally:
            stream.close()  # cancelled, disconnected, past its deadline, or done: free the session now
            for task in (reader, watchdog):
                task.cancel()
            for task in (reader, watchdog):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    @grpc_errors
    async def Synthesize(
        self, request: pb.SynthesizeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AudioPacket]:
        started = time.perf_counter()
        self.rt.check_ready()
        limit = self.rt.config.max_synthesize_chars
        if not has_speech(request.text):
            raise InvalidInputError(
                "is empty: there is nothing to say (only whitespace or control characters)", field="text"
            )
        if len(request.text) > limit:
            raise InvalidInputError(
                f"has {len(request.text)} characters; at most {limit} (max_synthesize_chars)", field="text"
            )
        session, fmt = await self.rt.session_from_config(request.config, whole_text=None)
        stream = SpeechStream(session, fmt, api=API, started_at=started)
        try:
            stream.text(request.text)
            stream.end()
            async for ev in stream.events():
                if isinstance(ev, AudioEvent) and (ev.samples or ev.last):
                    yield pb.AudioPacket(
                        audio=ev.data, sequence_number=ev.seq, sample_offset=ev.sample_offset, last=ev.last
                    )
        finally:
            stream.close()

    @grpc_errors
    async def CreateVoice(
        self, request: pb.CreateVoiceRequest, context: grpc.aio.ServicerContext
    ) -> pb.Voice:
        self.rt.check_ready()
        rec = await self.rt.create_voice(
            request.ref_audio,
            request.ref_text,
            request.x_vector_only,
            request.display_name,
            ref_audio_url=request.ref_audio_url,
        )
        return voice_message(rec)

    @grpc_errors
    async def GetVoice(self, request: pb.GetVoiceRequest, context: grpc.aio.ServicerContext) -> pb.Voice:
        self.rt.check_ready()
        return voice_message(await self.rt.in_io_thread(self.rt.require_store().get, request.voice_id))

    @grpc_errors
    async def ListVoices(
        self, request: pb.ListVoicesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListVoicesResponse:
        self.rt.check_ready()
        records = await self.rt.in_io_thread(self.rt.require_store().list)
        return pb.ListVoicesResponse(voices=[voice_message(r) for r in records])

    @grpc_errors
    async def DeleteVoice(
        self, request: pb.DeleteVoiceRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteVoiceResponse:
        self.rt.check_ready()
        await self.rt.in_io_thread(self.rt.require_store().delete, request.voice_id)
        return pb.DeleteVoiceResponse()

    @grpc_errors
    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerInfo:
        self.rt.check_ready()
        ckpt, cfg = self.rt.checkpoint, self.rt.config
        rules = cfg.ref_audio
        return pb.ServerInfo(
            model_id=self.rt.model_id,
            model_kind=ckpt.config.tts_model_type,
            model_size=ckpt.config.tts_model_size,
            languages=ckpt.config.languages,
            speakers=ckpt.config.speakers,
            sample_rates_hz=list(SUPPORTED_OUTPUT_RATES),
            encodings=[pb.PCM_S16LE, pb.FLOAT32_LE, pb.MULAW, pb.ALAW],
            limits=pb.Limits(
                max_sessions=cfg.max_sessions,
                max_utterance_chars=cfg.max_utterance_chars,
                max_ref_audio_bytes=rules.max_bytes,
                max_ref_audio_seconds=rules.max_seconds,
                min_ref_audio_seconds=rules.min_seconds,
                max_message_bytes=cfg.max_receive_bytes,
            ),
            version=__version__,
            device=str(ckpt.model.device),
            dtype=str(ckpt.model.dtype).removeprefix("torch."),
            packets=packet_defaults(cfg.engine),
        )
