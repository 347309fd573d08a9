"""Pipecat TTS service for a qwen3tts-rt server (``pip install qwen3tts-rt[pipecat]``).

A minimal bot (any LLM service; a transport that plays audio)::

    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineWorker
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
    from pipecat.workers.runner import WorkerRunner
    from qwen3tts_rt.integrations.pipecat import Qwen3TTSService

    tts = Qwen3TTSService(
        address="127.0.0.1:50051",  # qwen3tts-rt serve
        settings=Qwen3TTSService.Settings(voice="vivian", language="en"),  # speaker or voice id
    )
    context = LLMContext([{"role": "system", "content": "You are a helpful voice assistant."}])
    aggregators = LLMContextAggregatorPair(context)
    pipeline = Pipeline([
        transport.input(), stt, aggregators.user(), llm, tts, transport.output(), aggregators.assistant(),
    ])
    runner = WorkerRunner()
    await runner.add_workers(PipelineWorker(pipeline))
    await runner.run()

How it maps onto the server's ``StreamSynthesize`` (the shape of Pipecat's first-party
websocket TTS services, on gRPC):

* **Text as it arrives.** The default aggregation is ``TextAggregationMode.TOKEN``: every
  LLM text frame is sent as it comes, unstripped (the server's dual-track layout starts
  speaking after the first words; sentence aggregation would add the time to the first
  full stop). ``text_aggregation_mode=SENTENCE`` is still accepted.
* **Contexts are named utterances.** Each Pipecat context id (one per LLM turn, one per
  ``TTSSpeakFrame``) starts a ``BeginUtterance{key=context id}`` carrying the current
  voice, language and instruct; the end of the turn sends ``Flush``. Audio, progress and
  the end of each utterance come back tagged with the key and go to that audio context.
* **Interruption is in-band.** ``on_audio_context_interrupted`` sends ``Cancel{key}``: the
  server stops that utterance within one frame and drops its queued audio; the stream and
  the other contexts (an uninterruptible one still speaking) go on.
* **Word timing.** ``Progress`` says how many characters the talker had read when the
  audio up to ``sample_offset`` was generated. A word is reported (``add_word_timestamps``)
  at the audio time when the talker had read ``word_lag`` further words (speech lags
  reading), so the assistant context aggregator keeps only words whose audio was played
  before an interruption; words never reported are dropped with the interrupted context.
  (In token mode Pipecat places words in the context sentence by sentence: the words of a
  sentence still being written when the interruption comes are dropped too.)
* **Metrics.** TTFB runs from the context's start (first text sent) to its first audio;
  usage (characters) per turn, the Pipecat way (the base class's streamed-token path).
* **Settings.** ``TTSUpdateSettingsFrame(delta=Qwen3TTSService.Settings(voice=..., language=...,
  instruct=...))``: a change during a turn ends the current utterance and the rest of the
  turn is a new utterance with the new settings (per-utterance options; no reconnect).
  ``voice`` is a built-in speaker (CustomVoice checkpoints) or a stored voice id
  (``CreateVoice``); ``instruct`` is the voice description (VoiceDesign) or style.
* **Sample rate.** The pipeline's output rate when the server produces it (8, 11.025, 12,
  16, 22.05, 24, 32, 44.1, 48 kHz), else 24 kHz resampled here.

**One gRPC channel per service and one long-lived stream.** The stream is opened when the
pipeline starts and reused for every turn: a turn then costs no stream setup, voice
lookup or session admission before its first audio, and the server's named utterances
already give each turn its own voice, cancel and accounting. The cost is one of the
server's ``--max-sessions`` held for the bot's lifetime, which is what a live
conversation needs anyway. A stream the server ends (``--stream-idle-timeout`` after 300 s
of silence, ``--max-stream-duration``, a restart) is reopened on the same channel at the
start of the next turn (``on_turn_context_created``, before the LLM's first token).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from loguru import logger
from pipecat.audio.utils import create_stream_resampler
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    ErrorFrame,
    Frame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
)
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TextAggregationMode, TTSService
from pipecat.transcriptions.language import Language
from pipecat.utils.types import NOT_GIVEN, NotGiven, is_given

from qwen3tts_rt.integrations.link import (
    ALL,
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


@dataclass
class Qwen3TTSSettings(TTSSettings):
    """Runtime-updatable settings of ``Qwen3TTSService``.

    Parameters:
        instruct: voice description (VoiceDesign checkpoints) or speaking style.
    """

    instruct: str | NotGiven | None = field(default_factory=lambda: NOT_GIVEN)


class Qwen3TTSService(TTSService):
    """Pipecat TTS over a qwen3tts-rt server's ``StreamSynthesize`` (see the module docstring)."""

    Settings = Qwen3TTSSettings
    _settings: Qwen3TTSSettings

    def __init__(
        self,
        *,
        address: str = "127.0.0.1:50051",
        auth_token: str | None = None,
        secure: bool = False,
        root_certificates: bytes | None = None,
        settings: Qwen3TTSSettings | None = None,
        sample_rate: int | None = None,
        seed: int | None = None,
        word_lag: int = 1,
        text_aggregation_mode: TextAggregationMode | None = TextAggregationMode.TOKEN,
        connect_timeout_s: float = 30.0,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            address: ``host:port`` of the qwen3tts-rt gRPC server.
            auth_token: the server's ``--auth-token`` (sent as a bearer token).
            secure: TLS (with ``root_certificates``, else the system roots).
            settings: voice (speaker or stored voice id), language, instruct.
            sample_rate: output rate (default: the pipeline's).
            seed: reproducible sampling (the server adds the utterance index).
            word_lag: words the talker must have read past a word before it counts as heard.
            text_aggregation_mode: TOKEN (default): send LLM text as it arrives.
            connect_timeout_s: for the server's info call and the stream opening.
        """
        defaults = Qwen3TTSSettings(model=None, voice=None, language=None, instruct=None)
        if settings is not None:
            defaults.apply_update(settings)
        super().__init__(
            text_aggregation_mode=text_aggregation_mode,
            push_text_frames=False,
            push_start_frame=True,
            pause_frame_processing=False,
            sample_rate=sample_rate,
            settings=defaults,
            reuse_context_id_within_turn=True,
            **kwargs,
        )
        if word_lag < 0:
            raise ValueError("word_lag must be >= 0")
        self._address = address
        self._metadata = auth_metadata(auth_token)
        self._secure = secure
        self._root_certificates = root_certificates
        self._seed = seed
        self._word_lag = word_lag
        self._connect_timeout_s = connect_timeout_s
        self._channel: Any = None
        self._stub: pb_grpc.TextToSpeechStub | None = None
        self._facts: ServerFacts | None = None
        self._link: SpeechLink | None = None
        self._connect_lock = asyncio.Lock()
        self._receive_task: asyncio.Task[None] | None = None
        self._server_rate = 0
        self._begun: dict[str, WordTimer] = {}  # contexts begun on the server, not done yet
        self._resamplers: dict[str, Any] = {}

    def can_generate_metrics(self) -> bool:
        return True

    @property
    def supports_processing_metrics(self) -> bool:
        return False  # run_tts only hands the text over; TTFB carries the latency

    def language_to_service_language(self, language: Language) -> str | None:
        return model_language(language, getattr(self, "_facts", None))  # (called from __init__)

    # ------------------------------------------------------------------ life cycle

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self._connect()

    async def stop(self, frame: EndFrame) -> None:
        await super().stop(frame)
        await self._disconnect()

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        await self._disconnect()

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._disconnect()

    async def _connect(self) -> None:
        """Open the channel (once) and the stream (again when the server ended it)."""
        async with self._connect_lock:
            if self._link is not None and not self._link.closed:
                return
            try:
                if self._channel is None:
                    self._channel = open_channel(
                        self._address, secure=self._secure, root_certificates=self._root_certificates
                    )
                    self._stub = pb_grpc.TextToSpeechStub(self._channel)
                assert self._stub is not None
                if self._facts is None:
                    self._facts = await server_facts(self._stub, self._metadata, self._connect_timeout_s)
                    if isinstance(self._settings.language, str):
                        self._settings.language = model_language(self._settings.language, self._facts)
                rate = self.sample_rate or MODEL_SAMPLE_RATE
                self._server_rate = rate if rate in self._facts.sample_rates else MODEL_SAMPLE_RATE
                cfg = stream_config(
                    self._voice(),
                    self._facts,
                    language=self._language(),
                    instruct=self._instruct(),
                    sample_rate=self._server_rate,
                    seed=self._seed,
                )
                link = SpeechLink(self._stub, cfg, self._metadata)
                queue = link.subscribe(ALL)
                await link.open()
                self._link = link
                if self._receive_task is not None:
                    await self.cancel_task(self._receive_task)
                self._receive_task = self.create_task(self._receive(link, queue), name="qwen3tts-receive")
                await self._call_event_handler("on_connected")
            except Exception as e:
                self._link = None
                await self.push_error(error_msg=f"{self}: cannot reach {self._address}: {e}", exception=e)
                await self._call_event_handler("on_connection_error", f"{e}")

    async def _disconnect(self) -> None:
        link, self._link = self._link, None
        if self._receive_task is not None:
            await self.cancel_task(self._receive_task)
            self._receive_task = None
        if link is not None:
            await link.close()
            await self._call_event_handler("on_disconnected")
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None
        self._begun.clear()
        self._resamplers.clear()

    # ------------------------------------------------------------------ settings

    def _voice(self) -> str | None:
        v = self._settings.voice
        return v if is_given(v) and v else None

    def _language(self) -> str:
        lang = self._settings.language
        return model_language(lang if is_given(lang) else None, self._facts)

    def _instruct(self) -> str | None:
        i = self._settings.instruct
        return i if is_given(i) and i else None

    def _options(self) -> pb.UtteranceOptions:
        return voice_options(
            self._voice(), self._facts, language=self._language(), instruct=self._instruct() or ""
        )

    async def _update_settings(self, delta: Any) -> dict[str, Any]:
        """Voice, language and instruct are per utterance: a change during a turn ends the
        current utterance, and the rest of the turn opens a new one with the new options."""
        changed = await super()._update_settings(delta)
        if changed.keys() & {"voice", "language", "instruct"} and self._turn_context_id:
            await self._push_sequencer_frames(
                await self._aggregated_frame_sequencer.finalize(self._turn_context_id),
                self._turn_context_id,
            )
            if self.audio_context_available(self._turn_context_id):
                await self.flush_audio(context_id=self._turn_context_id)
            self._turn_context_id = None
            self._turn_context_id = self.create_context_id()
        return changed

    # ------------------------------------------------------------------ text in

    async def on_turn_context_created(self, context_id: str) -> None:
        # reopen a stream the server ended while the LLM thinks about its first token
        if self._link is None or self._link.closed:
            await self._connect()

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        """Send ``text`` to the utterance of ``context_id`` (begun on its first text)."""
        if self._link is None or self._link.closed:
            await self._connect()
        link = self._link
        if link is None:
            yield ErrorFrame(error=f"{self}: not connected to {self._address}")
            return
        try:
            if context_id not in self._begun:
                self._begun[context_id] = WordTimer(self._word_lag)
                link.begin(context_id, self._options())
            self._begun[context_id].text += text
            link.text(text)
            await self.start_tts_usage_metrics(text)
        except LinkClosed as e:
            yield ErrorFrame(error=f"{self}: the stream ended ({e}); the next turn reconnects")
            return
        yield None

    async def flush_audio(self, context_id: str | None = None) -> None:
        """End of the turn: the utterance is spoken to its end."""
        key = context_id or self.get_active_audio_context_id()
        link = self._link
        if key and key in self._begun and link is not None and not link.closed:
            link.flush()

    async def on_audio_context_interrupted(self, context_id: str) -> None:
        await self.stop_all_metrics()
        link = self._link
        if context_id in self._begun and link is not None:
            link.cancel(context_id)
        self._begun.pop(context_id, None)
        self._resamplers.pop(context_id, None)
        await super().on_audio_context_interrupted(context_id)

    # ------------------------------------------------------------------ audio out

    def _seconds(self, samples: int) -> float:
        return samples / float(self._server_rate or MODEL_SAMPLE_RATE)

    async def _audio(self, key: str, data: bytes) -> bytes:
        if self._server_rate == self.sample_rate:
            return data
        rs = self._resamplers.get(key)
        if rs is None:
            rs = self._resamplers[key] = create_stream_resampler()
        out: bytes = await rs.resample(data, self._server_rate, self.sample_rate)
        return out

    async def _receive(self, link: SpeechLink, queue: asyncio.Queue[Any]) -> None:
        while True:
            item = await queue.get()
            if isinstance(item, LinkClosed):
                await self._link_ended(link, item)
                return
            await self._handle(item)

    async def _handle(self, resp: pb.StreamResponse) -> None:
        kind = resp.WhichOneof("response")
        if kind == "audio":
            key = resp.audio.key
            if self.audio_context_available(key) and key in self._begun:
                audio = await self._audio(key, resp.audio.audio)
                if audio:
                    frame = TTSAudioRawFrame(audio, self.sample_rate, 1, context_id=key)
                    await self.append_to_audio_context(key, frame)
        elif kind == "progress":
            key = resp.progress.key
            words = self._begun.get(key)
            if words is not None and self.audio_context_available(key):
                due = words.due(resp.progress.chars_consumed, self._seconds(resp.progress.sample_offset))
                if due:
                    await self.add_word_timestamps(due, key)
        elif kind == "utterance_done":
            done = resp.utterance_done
            key = done.key
            words = self._begun.pop(key, None)
            self._resamplers.pop(key, None)
            if done.reason == pb.UtteranceDone.CANCELLED or not self.audio_context_available(key):
                return
            if words is not None:
                rest = words.due(len(words.text), done.audio_seconds, done=True)
                if rest:
                    await self.add_word_timestamps(rest, key)
            await self.stop_ttfb_metrics()
            await self.append_to_audio_context(key, TTSStoppedFrame(context_id=key))
            await self.remove_audio_context(key)

    async def _link_ended(self, link: SpeechLink, error: LinkClosed) -> None:
        """The server ended the stream: close the contexts it was speaking; the next turn
        reopens it. An idle stream ending (no context open) is routine."""
        if self._link is link:
            self._link = None
        open_keys = [k for k in self._begun if self.audio_context_available(k)]
        self._begun.clear()
        if open_keys:
            await self.push_error(error_msg=f"{self}: the stream ended mid-utterance: {error}")
        else:
            logger.debug(f"{self}: stream ended ({error}); reconnecting at the next turn")
        for key in open_keys:
            await self.append_to_audio_context(key, TTSStoppedFrame(context_id=key))
            await self.remove_audio_context(key)


__all__ = ["Qwen3TTSService", "Qwen3TTSSettings"]
