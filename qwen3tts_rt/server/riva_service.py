"""``nvidia.riva.tts.RivaSpeechSynthesis``, so that stock Riva clients (the
``nvidia-riva-client`` package, its ``talk.py``) work against this server unchanged.

The messages and the servicer base come from the installed ``nvidia-riva-client``
package's compiled protos (same names and field numbers by construction). Mapping:

* ``voice_name`` -> a stored voice id or a built-in speaker; Riva's ``Model.voice`` form
  is accepted (the part after the last dot is used, as ``talk.py --list-voices`` prints).
  Empty: the server's default voice, else the first speaker (CustomVoice) or the oldest
  stored voice (Base).
* ``zero_shot_data`` -> an inline clone (ICL with its transcript, else x-vector only);
  raw LINEAR_PCM prompts use ``zero_shot_data.sample_rate_hz``.
* ``language_code`` (BCP-47 like ``en-US``, or a model language name, or ``auto``)
  -> the model's languages.
* ``encoding`` LINEAR_PCM (16-bit), MULAW, ALAW at ``sample_rate_hz``.
* ``custom_configuration``: ``instruct`` (VoiceDesign / style), ``seed``.
* ``SynthesizeOnline``: the first request carries the settings; every request's text is
  a delta of one text (old one-request clients send just one); the end of the client's
  stream ends the text.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np

from qwen3tts_rt.audio import is_audio_file
from qwen3tts_rt.engine.voices import voice_prompt
from qwen3tts_rt.errors import CapacityError, InvalidInputError, UnknownLanguageError, UnknownVoiceError
from qwen3tts_rt.model.prompt import VoicePrompt
from qwen3tts_rt.server.errors import grpc_errors
from qwen3tts_rt.server.runtime import OutputFormat, Runtime, output_format
from qwen3tts_rt.server.stream import AudioEvent, SpeechStream, has_speech
from qwen3tts_rt.v1 import tts_pb2 as pb

# Importing these registers nvidia.riva.* in the default descriptor pool (used by reflection).
from riva.client.proto import riva_audio_pb2 as riva_audio  # isort: skip
from riva.client.proto import riva_tts_pb2 as rtts  # isort: skip
from riva.client.proto import riva_tts_pb2_grpc as rtts_grpc  # isort: skip

API = "riva"
SERVICE_NAME = "nvidia.riva.tts.RivaSpeechSynthesis"
VOICE_PREFIX = "Qwen3-TTS"

# model language -> the BCP-47 code listed to Riva clients
LANGUAGE_CODES = {
    "english": "en-US",
    "chinese": "zh-CN",
    "german": "de-DE",
    "spanish": "es-US",
    "japanese": "ja-JP",
    "french": "fr-FR",
    "korean": "ko-KR",
    "russian": "ru-RU",
    "italian": "it-IT",
    "portuguese": "pt-BR",
}
_PRIMARY = {code.split("-")[0]: lang for lang, code in LANGUAGE_CODES.items()}

_ENCODINGS = {
    riva_audio.ENCODING_UNSPECIFIED: pb.PCM_S16LE,
    riva_audio.LINEAR_PCM: pb.PCM_S16LE,
    riva_audio.MULAW: pb.MULAW,
    riva_audio.ALAW: pb.ALAW,
}


def model_language(language_code: str, languages: list[str]) -> str:
    """``en-US`` / ``en`` / ``english`` / ``auto`` -> a model language name."""
    code = language_code.strip().lower().replace("_", "-")
    if code in ("", "auto"):
        return "auto"
    if code in languages:
        return code
    lang = _PRIMARY.get(code.split("-")[0])
    if lang is None or lang not in languages:
        known = ", ".join(LANGUAGE_CODES[x] for x in languages if x in LANGUAGE_CODES)
        raise UnknownLanguageError(
            f"'{language_code}' is not a language of this model; use one of: {known} (or auto)",
            field="language_code",
        )
    return lang


def riva_output_format(req: rtts.SynthesizeSpeechRequest) -> OutputFormat:
    if req.encoding not in _ENCODINGS:
        name = riva_audio.AudioEncoding.Name(req.encoding) if req.encoding in (2, 4) else str(req.encoding)
        raise InvalidInputError(f"{name} is not supported; use LINEAR_PCM, MULAW or ALAW", field="encoding")
    return output_format(req.sample_rate_hz, _ENCODINGS[req.encoding], prefix="")


class RivaSpeechSynthesisServicer(rtts_grpc.RivaSpeechSynthesisServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    # ------------------------------------------------------------------ mapping

    async def _voice(self, req: rtts.SynthesizeSpeechRequest) -> VoicePrompt:
        rt, ckpt = self.rt, self.rt.checkpoint
        instruct = req.custom_configuration.get("instruct") or None
        rt.check_instruct(instruct or "", field="custom_configuration.instruct")
        zs = req.zero_shot_data
        if zs.audio_prompt:
            audio: bytes | np.ndarray = zs.audio_prompt
            rate = None
            # the content decides: a file (WAV, MP3, ...) is decoded as a file whatever the
            # declared encoding; LINEAR_PCM that is no file is raw 16-bit samples
            if zs.encoding == riva_audio.LINEAR_PCM and not is_audio_file(zs.audio_prompt):
                if zs.sample_rate_hz <= 0:
                    raise InvalidInputError(
                        "raw LINEAR_PCM audio needs its sample rate", field="zero_shot_data.sample_rate_hz"
                    )
                audio = np.frombuffer(zs.audio_prompt[: len(zs.audio_prompt) // 2 * 2], dtype="<i2")
                rate = zs.sample_rate_hz
            try:
                cloned = await rt.clone(audio, zs.transcript, not zs.transcript, sample_rate=rate)
            except InvalidInputError as e:
                if e.field in ("ref_audio", None):
                    e.field = "zero_shot_data.audio_prompt"
                elif e.field == "ref_text":
                    e.field = "zero_shot_data.transcript"
                raise
            return voice_prompt(ckpt, clone=cloned.prompt, instruct=instruct)
        name = req.voice_name.strip()
        if name:
            return await rt.named_voice(name.rsplit(".", 1)[-1], field="voice_name", instruct=instruct)
        if rt.config.default_voice:
            return await rt.named_voice(rt.config.default_voice, field="voice_name", instruct=instruct)
        kind = ckpt.config.tts_model_type
        if kind == "custom_voice":
            return await rt.named_voice(ckpt.config.speakers[0], field="voice_name", instruct=instruct)
        if kind == "base":
            voices = rt.require_store().list()
            if not voices:
                raise UnknownVoiceError(
                    "this Base checkpoint speaks only with a cloned voice and none is stored: pass "
                    "zero_shot_data, or create a voice (qwen3tts-rt voice create) and pass its id",
                    field="voice_name",
                )
            return await rt.named_voice(voices[0].voice_id, field="voice_name", instruct=instruct)
        return voice_prompt(ckpt, instruct=instruct)  # VoiceDesign

    async def _stream(self, req: rtts.SynthesizeSpeechRequest, started: float) -> SpeechStream:
        rt = self.rt
        rt.check_ready()
        fmt = riva_output_format(req)
        language = model_language(req.language_code, rt.checkpoint.config.languages)
        voice = await self._voice(req)
        seed = None
        if "seed" in req.custom_configuration:
            try:
                seed = int(req.custom_configuration["seed"])
            except ValueError:
                raise InvalidInputError("must be an integer", field="custom_configuration.seed") from None
        params = rt.sampling(pb.SamplingParams(), prefix="")
        session = rt.open_session(voice, language, params, seed=seed, prefix="")
        return SpeechStream(session, fmt, api=API, started_at=started)

    def _check_text(self, text: str, *, allow_empty: bool = False) -> None:
        limit = self.rt.config.max_synthesize_chars
        if not allow_empty and not has_speech(text):
            raise InvalidInputError(
                "is empty: there is nothing to say (only whitespace or control characters)", field="text"
            )
        if len(text) > limit:
            raise InvalidInputError(
                f"has {len(text)} characters; at most {limit} (max_synthesize_chars)", field="text"
            )

    # ------------------------------------------------------------------ RPCs

    @grpc_errors
    async def Synthesize(
        self, request: rtts.SynthesizeSpeechRequest, context: grpc.aio.ServicerContext
    ) -> rtts.SynthesizeSpeechResponse:
        self._check_text(request.text)
        stream = await self._stream(request, time.perf_counter())
        chunks: list[bytes] = []
        size = 0
        try:
            stream.text(request.text)
            stream.end()
            async for ev in stream.events():
                if isinstance(ev, AudioEvent):
                    chunks.append(ev.data)
                    size += len(ev.data)
                    if size > self.rt.config.max_response_bytes:
                        raise CapacityError(
                            f"the audio exceeds {self.rt.config.max_response_bytes} bytes "
                            "(max_response_bytes); use SynthesizeOnline for long texts"
                        )
        finally:
            stream.close()
        resp = rtts.SynthesizeSpeechResponse(audio=b"".join(chunks))
        resp.meta.text = request.text
        resp.meta.processed_text = request.text
        if request.HasField("id"):
            resp.id.CopyFrom(request.id)
        return resp

    @grpc_errors
    async def SynthesizeOnline(
        self, request_iterator: AsyncIterator[rtts.SynthesizeSpeechRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rtts.SynthesizeSpeechResponse]:
        started = time.perf_counter()
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            return
        self._check_text(first.text, allow_empty=True)
        stream = await self._stream(first, started)
        stream.text(first.text)
        total = len(first.text)

        async def read() -> None:
            nonlocal total
            try:
                async for req in requests:
                    total += len(req.text)
                    if total > self.rt.config.max_synthesize_chars:
                        raise InvalidInputError(
                            f"the stream's text exceeds {self.rt.config.max_synthesize_chars} characters "
                            "(max_synthesize_chars)",
                            field="text",
                        )
                    stream.text(req.text)
                stream.end()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                stream.fail(e)

        reader = asyncio.create_task(read(), name="riva-reader")
        try:
            async for ev in stream.events():
                if isinstance(ev, AudioEvent) and ev.samples:
                    resp = rtts.SynthesizeSpeechResponse(audio=ev.data)
                    if first.HasField("id"):
                        resp.id.CopyFrom(first.id)
                    yield resp
        finally:
            stream.close()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    @grpc_errors
    async def GetRivaSynthesisConfig(
        self, request: rtts.RivaSynthesisConfigRequest, context: grpc.aio.ServicerContext
    ) -> rtts.RivaSynthesisConfigResponse:
        self.rt.check_ready()
        ckpt = self.rt.checkpoint
        cfg = ckpt.config
        model_name = f"qwen3-tts-{cfg.tts_model_size}-{cfg.tts_model_type}".replace("_", "-")
        resp = rtts.RivaSynthesisConfigResponse()
        if request.model_name and request.model_name != model_name:
            return resp
        if cfg.tts_model_type == "custom_voice":
            voices = list(cfg.speakers)
        elif cfg.tts_model_type == "base":
            voices = [r.voice_id for r in self.rt.require_store().list()]
        else:
            voices = []
        if not voices:
            return resp
        subvoices = ",".join(f"{v}:{i}" for i, v in enumerate(voices))
        for lang in cfg.languages:
            code = LANGUAGE_CODES.get(lang)
            if code is None:
                continue
            mc = resp.model_config.add()
            mc.model_name = model_name
            mc.parameters["language_code"] = code
            mc.parameters["voice_name"] = VOICE_PREFIX
            mc.parameters["subvoices"] = subvoices
            mc.parameters["sample_rate"] = "24000"
            mc.parameters["type"] = "online"
        return resp


def add_to_server(servicer: RivaSpeechSynthesisServicer, server: grpc.aio.Server) -> None:
    rtts_grpc.add_RivaSpeechSynthesisServicer_to_server(servicer, server)
