"""``nvidia.riva.tts.RivaSpeechSynthesis``, so that stock Riva clients (the
``nvidia-riva-client`` package, its ``talk.py``, Pipecat's and LiveKit's NVIDIA TTS
classes) work against this server unchanged.

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
* ``encoding`` LINEAR_PCM (16-bit), MULAW, ALAW at ``sample_rate_hz`` (any rate of
  ``SUPPORTED_OUTPUT_RATES``: 8, 11.025, 12, 16, 22.05, 24, 32, 44.1, 48 kHz).
* ``custom_configuration`` (``key:value,...`` in the stock clients):
  ``instruct`` (VoiceDesign / style), ``seed``, ``non_streaming_mode`` (``true``/``false``:
  the layout; default for ``Synthesize``: the official default of the voice, true for
  speakers and voice design, false for clones; for ``SynthesizeOnline``: false, speech
  starts after the first words), ``raw_deltas`` (``true``: see below).
* ``SynthesizeOnline``: the first request carries the settings; **each request's text is
  one text** (as the stock client documents a multi-text ``synthesize_online``), and the
  texts are spoken as one utterance, joined as separate pieces: a space goes between two
  texts where neither side has whitespace, except between two CJK characters (Chinese
  and Japanese put no space between sentences). So Pipecat's stitched mode (stripped
  sentences, long ones cut at whitespace) is spoken with its word boundaries, and equals
  the same text sent whole. ``raw_deltas:true`` concatenates the texts as they are, for
  clients that stream LLM deltas through Riva. The end of the client's stream ends the
  text.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np

from qwen3tts_rt.audio import is_audio_file
from qwen3tts_rt.engine.text import has_speech
from qwen3tts_rt.engine.voices import voice_prompt
from qwen3tts_rt.errors import CapacityError, InvalidInputError, UnknownLanguageError, UnknownVoiceError, echo
from qwen3tts_rt.model.prompt import VoicePrompt
from qwen3tts_rt.server.errors import grpc_errors
from qwen3tts_rt.server.runtime import OutputFormat, Runtime, output_format
from qwen3tts_rt.server.stream import AudioEvent, SpeechStream
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
            f"{echo(language_code)} is not a language of this model; use one of: {known} (or auto)",
            field="language_code",
        )
    return lang


# custom_configuration keys (besides instruct and seed)
RAW_DELTAS = "raw_deltas"
NON_STREAMING_MODE = "non_streaming_mode"
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _no_space_char(ch: str) -> bool:
    """Characters of scripts written without spaces between words and sentences, and
    their full-width punctuation: CJK ideographs, kana, CJK symbols, full-width forms.
    (Hangul is not among them: Korean puts spaces between words.)"""
    o = ord(ch)
    return (
        0x2E80 <= o <= 0x2FDF  # CJK radicals
        or 0x3000 <= o <= 0x30FF  # CJK symbols and punctuation, hiragana, katakana
        or 0x31F0 <= o <= 0x31FF  # katakana extensions
        or 0x3400 <= o <= 0x4DBF  # CJK extension A
        or 0x4E00 <= o <= 0x9FFF  # CJK unified ideographs
        or 0xF900 <= o <= 0xFAFF  # CJK compatibility ideographs
        or 0xFF00 <= o <= 0xFFEF  # half-width and full-width forms
        or 0x20000 <= o <= 0x3FFFF  # CJK extensions B and later
    )


def piece_separator(before: str, text: str) -> str:
    """What goes between the text sent so far (``before``) and the next request's
    ``text``: a space where neither side has whitespace at the seam, nothing between two
    CJK characters, nothing at the start."""
    if not before or not text or before[-1].isspace() or text[0].isspace():
        return ""
    if _no_space_char(before[-1]) and _no_space_char(text[0]):
        return ""
    return " "


class TextJoiner:
    """The text of a ``SynthesizeOnline`` stream, request by request: each request's text
    is a piece of its own (``piece_separator``), or, with ``raw``, a raw delta."""

    def __init__(self, *, raw: bool = False) -> None:
        self.raw = raw
        self._last = ""  # the last character pushed so far
        self.chars = 0  # characters pushed, separators included

    def piece(self, text: str) -> str:
        """The delta to push for one request's text."""
        if not text:
            return ""
        delta = text if self.raw else piece_separator(self._last, text) + text
        self._last = delta[-1]
        self.chars += len(delta)
        return delta


def _custom_bool(req: rtts.SynthesizeSpeechRequest, key: str) -> bool | None:
    raw = req.custom_configuration.get(key)
    if raw is None:
        return None
    value = _BOOLS.get(raw.strip().lower())
    if value is None:
        raise InvalidInputError(
            f"'{raw[:40]}' is not a boolean; use true or false", field=f"custom_configuration.{key}"
        )
    return value


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

    async def _stream(
        self, req: rtts.SynthesizeSpeechRequest, started: float, *, whole_text: bool
    ) -> SpeechStream:
        """Open the session of a request. Layout: ``custom_configuration`` non_streaming_mode
        if given, else for a whole text (unary Synthesize) the official default of the voice,
        else dual-track."""
        rt = self.rt
        rt.check_ready()
        fmt = riva_output_format(req)
        language = model_language(req.language_code, rt.checkpoint.config.languages)
        non_streaming = _custom_bool(req, NON_STREAMING_MODE)
        voice = await self._voice(req)
        seed = None
        if "seed" in req.custom_configuration:
            try:
                seed = int(req.custom_configuration["seed"])
            except ValueError:
                raise InvalidInputError("must be an integer", field="custom_configuration.seed") from None
        if non_streaming is None:
            non_streaming = rt.official_non_streaming_default(voice) if whole_text else False
        params = rt.sampling(pb.SamplingParams(), prefix="")
        session = rt.open_session(
            voice, language, params, seed=seed, non_streaming_mode=non_streaming, prefix=""
        )
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
        stream = await self._stream(request, time.perf_counter(), whole_text=True)
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
        joiner = TextJoiner(raw=bool(_custom_bool(first, RAW_DELTAS)))
        stream = await self._stream(first, started, whole_text=False)
        stream.text(joiner.piece(first.text))

        async def read() -> None:
            limit = self.rt.config.max_synthesize_chars
            try:
                async for req in requests:
                    delta = joiner.piece(req.text)
                    if joiner.chars > limit:
                        raise InvalidInputError(
                            f"the stream's text exceeds {limit} characters (max_synthesize_chars)",
                            field="text",
                        )
                    if delta:
                        stream.text(delta)
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
