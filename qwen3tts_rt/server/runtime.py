"""What the servicers share: the loaded checkpoint, the engine, the voice store, and the
mapping from request fields to engine inputs (voices, sampling, output format).

Nothing blocking runs on the asyncio loop, and nothing waits behind unrelated work:

* every device call (generation, the speaker and codec encoders of voice cloning, warm-up)
  runs on the engine's device thread (``Engine.submit`` for the encoders, between ticks);
* decoding and validating reference audio runs on a CPU pool (``clone_workers`` threads);
* voice-store reads and writes run on their own I/O pool, so a stream whose voice is
  stored never waits behind clonings.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qwen3tts_rt import metrics
from qwen3tts_rt.audio import SUPPORTED_OUTPUT_RATES, PcmEncoding, load_reference_audio
from qwen3tts_rt.engine.engine import Engine, EngineConfig, Session, UtteranceOptions
from qwen3tts_rt.engine.messages import SessionClosed, SessionError
from qwen3tts_rt.engine.voices import (
    VoiceClonePrompt,
    check_clone_request,
    encode_clone_prompt,
    model_fingerprint,
    voice_prompt,
)
from qwen3tts_rt.errors import (
    CapacityError,
    InvalidInputError,
    NotFoundError,
    ReferenceAudioError,
    UnknownVoiceError,
)
from qwen3tts_rt.model.checkpoint import Checkpoint, load_checkpoint
from qwen3tts_rt.model.prompt import VoicePrompt, default_non_streaming_mode
from qwen3tts_rt.model.sampling import SamplingParams
from qwen3tts_rt.server.config import ServerConfig
from qwen3tts_rt.server.errors import UnavailableError, with_field_prefix
from qwen3tts_rt.server.ref_fetch import FetchLimits, RefAudioFetcher, RefAudioUrlError
from qwen3tts_rt.server.voice_store import VoiceRecord, VoiceStore, is_valid_voice_id, request_hash
from qwen3tts_rt.synthetic import synthetic_speech
from qwen3tts_rt.v1 import tts_pb2 as pb

log = logging.getLogger(__name__)

ENCODINGS: dict[int, PcmEncoding] = {
    pb.AUDIO_ENCODING_UNSPECIFIED: PcmEncoding.PCM_S16LE,
    pb.PCM_S16LE: PcmEncoding.PCM_S16LE,
    pb.FLOAT32_LE: PcmEncoding.FLOAT32_LE,
    pb.MULAW: PcmEncoding.MULAW,
    pb.ALAW: PcmEncoding.ALAW,
}
MAX_SEED = 2**63 - 1 - 1_000_000  # the engine adds the utterance index to the seed
PACKET_POLICIES: dict[int, str] = {pb.PACKET_POLICY_FIXED: "fixed", pb.PACKET_POLICY_ADAPTIVE: "adaptive"}


def wire_packet_policy(value: int, field: str = "config.packet_policy") -> str | None:
    """The engine's name of a wire ``PacketPolicy`` (None: unspecified)."""
    if value == pb.PACKET_POLICY_UNSPECIFIED:
        return None
    if value not in PACKET_POLICIES:
        raise InvalidInputError(f"unknown packet policy {value}", field=field)
    return PACKET_POLICIES[value]


def packet_defaults(engine: EngineConfig) -> pb.PacketDefaults:
    """What a stream whose config leaves the packet fields unset gets (``GetServerInfo``)."""
    return pb.PacketDefaults(
        policy=f"PACKET_POLICY_{engine.packet_policy.upper()}",  # the enum value of that name
        first_packet_frames=engine.first_packet_frames,
        packet_frames=engine.packet_frames,
        max_packet_frames=engine.max_packet_frames,
        margin_s=engine.packet_margin_s,
    )


@dataclass(frozen=True)
class OutputFormat:
    sample_rate: int
    encoding: PcmEncoding


def output_format(sample_rate_hz: int, encoding: int, *, prefix: str = "config.") -> OutputFormat:
    rate = sample_rate_hz or 24000
    if rate not in SUPPORTED_OUTPUT_RATES:
        allowed = ", ".join(str(r) for r in SUPPORTED_OUTPUT_RATES)
        raise InvalidInputError(
            f"{sample_rate_hz} Hz is not supported; choose one of {allowed} (0 = 24000)",
            field=f"{prefix}sample_rate_hz",
        )
    if encoding not in ENCODINGS:
        raise InvalidInputError(
            f"encoding {encoding} is not supported; choose one of PCM_S16LE, FLOAT32_LE, MULAW, ALAW",
            field=f"{prefix}encoding",
        )
    return OutputFormat(rate, ENCODINGS[encoding])


@dataclass(frozen=True)
class ClonedVoice:
    prompt: VoiceClonePrompt
    seconds: float
    notes: list[str]


class Runtime:
    """Owns the model, the engine and the voice store once ``load`` has run."""

    def __init__(self, config: ServerConfig, ckpt: Checkpoint | None = None) -> None:
        self.config = config
        self.ckpt: Checkpoint | None = ckpt
        self.engine: Engine | None = None
        self.store: VoiceStore | None = None
        self.ready = False
        self.draining = False
        self.model_id = config.model
        # reference audio decoding (CPU) and voice-store I/O: separate pools (module docstring)
        self._cpu_pool = concurrent.futures.ThreadPoolExecutor(
            config.clone_workers, thread_name_prefix="qwen3tts-clone"
        )
        self._io_pool = concurrent.futures.ThreadPoolExecutor(
            config.io_workers, thread_name_prefix="qwen3tts-voice-io"
        )
        self._voice_jobs = 0  # clonings queued or running (changed on the event loop only)
        self._fetcher = RefAudioFetcher(  # ref_audio_url downloads (used where allowed)
            FetchLimits(
                max_bytes=config.ref_audio.max_bytes,
                timeout_s=config.ref_audio_url_timeout_s,
                max_redirects=config.ref_audio_url_max_redirects,
                allow_private=config.ref_audio_url_allow_private,
                max_concurrent=config.ref_audio_url_max_concurrent,
            )
        )

    # ------------------------------------------------------------------ life cycle

    def load(self) -> None:
        """Load the checkpoint (unless given), start the engine, open the voice store and
        warm up. Blocking: call it from a thread."""
        cfg = self.config
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        if self.ckpt is None:
            t0 = time.perf_counter()
            self.ckpt = load_checkpoint(cfg.model, device=cfg.device, dtype=cfg.dtype)
            log.info("loaded %s in %.1f s", cfg.model, time.perf_counter() - t0)
        self.engine = Engine(self.ckpt, cfg.engine)
        self.engine.on_tick = metrics.observe_tick
        self.engine.on_decode = metrics.observe_decode
        metrics.track_engine(self.engine)
        from qwen3tts_rt.server.voice_store import open_voice_store  # directory or Redis, per cfg

        self.store = open_voice_store(cfg, model_fingerprint(self.ckpt))
        if cfg.warmup:
            t0 = time.perf_counter()
            self._warmup()
            log.info("warmed up in %.2f s", time.perf_counter() - t0)
        self.ready = True

    def shutdown(self) -> None:
        """Stop the engine and the worker pools. Safe to call twice."""
        self.ready = False
        if self.engine is not None:
            self.engine.shutdown()
            metrics.untrack_engine(self.engine)
        self._cpu_pool.shutdown(wait=False, cancel_futures=True)
        self._io_pool.shutdown(wait=False, cancel_futures=True)
        if self.store is not None:
            self.store.close()

    def _warmup(self) -> None:
        """Capture the CUDA graphs of every batch bucket (nothing to do on CPU), then speak
        one short utterance, so the first client meets no capture or lazy-init stall."""
        ckpt, engine = self.checkpoint, self.require_engine()
        engine.warmup(timeout=600)
        kind = ckpt.config.tts_model_type
        if kind == "base":
            wav = synthetic_speech(1.5)
            audio = load_reference_audio(wav, sample_rate=24000, allow_paths=False)
            clone = engine.submit(lambda: encode_clone_prompt(ckpt, audio, "Warm up.", x_vector_only=False))
            voice = voice_prompt(ckpt, clone=clone.result(timeout=600))
        elif kind == "custom_voice":
            voice = voice_prompt(ckpt, speaker=ckpt.config.speakers[0])
        else:
            voice = voice_prompt(ckpt, instruct="A clear, calm voice.")
        params = SamplingParams.greedy(max_new_tokens=4)
        session = engine.open_session(voice, "auto", params)
        session.push_text("Hello.")
        session.end_text()
        for msg in session.messages(timeout=600):
            if isinstance(msg, SessionError):
                raise RuntimeError(f"warm-up failed: {msg.message}")
            if isinstance(msg, SessionClosed):
                break

    # ------------------------------------------------------------------ access

    def check_ready(self) -> None:
        if self.draining:
            raise UnavailableError("the server is shutting down; retry on another instance")
        if not self.ready:
            raise UnavailableError("the model is still loading; retry shortly (see the health service)")

    @property
    def checkpoint(self) -> Checkpoint:
        if self.ckpt is None:
            raise UnavailableError("the model is still loading")
        return self.ckpt

    def require_engine(self) -> Engine:
        if self.engine is None:
            raise UnavailableError("the model is still loading")
        return self.engine

    def require_store(self) -> VoiceStore:
        if self.store is None:
            raise UnavailableError("the model is still loading")
        return self.store

    async def in_io_thread(self, fn: Any, *args: Any, **kw: Any) -> Any:
        """Voice-store work, on the I/O pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._io_pool, lambda: fn(*args, **kw))

    async def on_device(self, fn: Any) -> Any:
        """Device work, on the engine's device thread between ticks."""
        return await asyncio.wrap_future(self.require_engine().submit(fn))

    # ------------------------------------------------------------------ voices

    async def _clone(
        self, ref_audio: Any, ref_text: str, x_vector_only: bool, sample_rate: int | None
    ) -> ClonedVoice:
        """Validate, decode on the CPU pool, encode on the device thread."""
        ckpt = self.checkpoint
        rules = self.config.ref_audio
        loop = asyncio.get_running_loop()
        audio = await loop.run_in_executor(
            self._cpu_pool,
            lambda: load_reference_audio(ref_audio, sample_rate=sample_rate, rules=rules, allow_paths=False),
        )
        check_clone_request(ckpt, ref_text or None, x_vector_only, rules)
        prompt: VoiceClonePrompt = await self.on_device(
            lambda: encode_clone_prompt(ckpt, audio, ref_text or None, x_vector_only=x_vector_only)
        )
        notes = list(audio.notes) + list(audio.warnings)
        return ClonedVoice(dataclasses.replace(prompt, notes=tuple(notes)), audio.duration_s, notes)

    async def fetch_ref_audio(self, ref_audio: bytes, ref_audio_url: str) -> bytes:
        """The bytes behind ``ref_audio_url``, where this server allows URLs. Downloaded on a
        worker thread of its own (not the voice thread: a slow host must not hold up the
        prompt loads of other streams), within the byte and time limits."""
        if not self.config.allow_ref_audio_urls:
            raise RefAudioUrlError(
                "this server does not fetch reference audio from URLs (setting allow_ref_audio_urls, "
                "`serve --allow-ref-audio-urls`); send the audio bytes in ref_audio"
            )
        if ref_audio:
            raise RefAudioUrlError("give the reference audio in ref_audio or ref_audio_url, not both")
        data: bytes = await asyncio.to_thread(self._fetcher.fetch, ref_audio_url)
        return data

    async def clone(
        self,
        ref_audio: bytes | np.ndarray,
        ref_text: str,
        x_vector_only: bool,
        *,
        sample_rate: int | None = None,
        ref_audio_url: str = "",
        audio_field: str = "ref_audio",
    ) -> ClonedVoice:
        """Reference audio (bytes, samples, or downloaded from ``ref_audio_url``) -> clone
        prompt (CPU pool, then the device thread). Audio rule errors name ``audio_field`` (the URL field
        when the audio came from one)."""
        if ref_audio_url:
            assert isinstance(ref_audio, bytes)
            ref_audio = await self.fetch_ref_audio(ref_audio, ref_audio_url)
            audio_field = "ref_audio_url"
        if isinstance(ref_audio, bytes) and not ref_audio:
            raise InvalidInputError(
                "is empty: send the bytes of a WAV/FLAC/MP3/OGG/M4A recording", field=audio_field
            )
        limit = self.config.max_voice_jobs
        if self._voice_jobs >= limit:  # each queued job holds its audio: the queue stays bounded
            raise CapacityError(
                f"{limit} voice clonings are already queued or running (max_voice_jobs); retry shortly"
            )
        self._voice_jobs += 1
        try:
            result = await self._clone(ref_audio, ref_text, x_vector_only, sample_rate)
        except ReferenceAudioError as e:
            if e.field == "ref_audio":
                e.field = audio_field
            raise
        finally:
            self._voice_jobs -= 1
        return result

    async def create_voice(
        self,
        ref_audio: bytes,
        ref_text: str,
        x_vector_only: bool,
        display_name: str,
        *,
        ref_audio_url: str = "",
    ) -> VoiceRecord:
        store = self.require_store()
        if len(display_name) > self.config.max_display_name_chars or not display_name.isprintable():
            raise InvalidInputError(
                f"must be printable text of at most {self.config.max_display_name_chars} characters",
                field="display_name",
            )
        audio_field = "ref_audio"
        if ref_audio_url:  # the downloaded bytes stand for the request (same content, same voice)
            ref_audio = await self.fetch_ref_audio(ref_audio, ref_audio_url)
            audio_field = "ref_audio_url"
        key = request_hash(ref_audio, ref_text, x_vector_only, display_name)
        existing = await self.in_io_thread(store.find_by_request, key)
        if existing is not None:  # computed once: the same request returns the same voice
            return existing
        cloned = await self.clone(ref_audio, ref_text, x_vector_only, audio_field=audio_field)
        rec: VoiceRecord = await self.in_io_thread(
            store.create,
            cloned.prompt,
            display_name=display_name,
            ref_audio_seconds=cloned.seconds,
            req_hash=key,
            notes=cloned.notes,
        )
        return rec

    async def stored_prompt(self, voice_id: str, *, field: str) -> VoiceClonePrompt:
        store = self.require_store()
        if not is_valid_voice_id(voice_id):
            raise UnknownVoiceError(f"unknown voice id '{voice_id[:80]}'; see ListVoices", field=field)
        try:
            prompt: VoiceClonePrompt = await self.in_io_thread(store.prompt, voice_id)
        except NotFoundError:
            raise UnknownVoiceError(
                f"unknown voice id '{voice_id[:80]}'; see ListVoices", field=field
            ) from None
        return prompt

    async def voice_from_config(self, cfg: pb.StreamConfig) -> VoicePrompt:
        """The ``VoicePrompt`` a StreamConfig asks for (fields named ``config.*`` in errors)."""
        ckpt = self.checkpoint
        which = cfg.WhichOneof("voice")
        instruct = cfg.instruct or None
        if which == "voice_id":
            prompt = await self.stored_prompt(cfg.voice_id, field="config.voice_id")
            return voice_prompt(ckpt, clone=prompt, instruct=instruct)
        if which == "clone":
            try:
                cloned = await self.clone(
                    cfg.clone.ref_audio,
                    cfg.clone.ref_text,
                    cfg.clone.x_vector_only,
                    ref_audio_url=cfg.clone.ref_audio_url,
                )
            except InvalidInputError as e:
                raise with_field_prefix(e, "config.clone.") from None
            return voice_prompt(ckpt, clone=cloned.prompt, instruct=instruct)
        if which == "speaker":
            return voice_prompt(ckpt, speaker=cfg.speaker, instruct=instruct)
        if instruct is None and self.config.default_voice:
            return await self.named_voice(self.config.default_voice, field="config.voice")
        return voice_prompt(ckpt, instruct=instruct)

    async def named_voice(self, name: str, *, field: str, instruct: str | None = None) -> VoicePrompt:
        """A voice id of the store, or a built-in speaker."""
        ckpt = self.checkpoint
        if is_valid_voice_id(name) and await self.in_io_thread(self.require_store().has, name):
            prompt = await self.stored_prompt(name, field=field)
            return voice_prompt(ckpt, clone=prompt, instruct=instruct)
        if name.lower() in ckpt.config.talker.speakers:
            return voice_prompt(ckpt, speaker=name.lower(), instruct=instruct)
        known = ", ".join(ckpt.config.speakers) or "none (this checkpoint clones voices: see ListVoices)"
        raise UnknownVoiceError(
            f"unknown voice '{name[:80]}': not a voice id; built-in speakers: {known}", field=field
        )

    # ------------------------------------------------------------------ sessions

    def check_instruct(self, instruct: str, *, field: str) -> None:
        """Voice descriptions are prefilled whole before the first frame: bounded."""
        limit = self.config.max_instruct_chars
        if len(instruct) > limit:
            raise InvalidInputError(
                f"has {len(instruct)} characters; at most {limit} (max_instruct_chars)", field=field
            )

    def sampling(
        self, sp: pb.SamplingParams, *, prefix: str = "config.sampling.", base: SamplingParams | None = None
    ) -> SamplingParams:
        """The request's sampling: its set fields over ``base`` (default: the checkpoint's
        generation_config.json)."""
        ckpt = self.checkpoint
        overrides: dict[str, Any] = {}
        for name in (
            "temperature",
            "top_k",
            "top_p",
            "repetition_penalty",
            "max_new_tokens",
            "subtalker_temperature",
            "subtalker_top_k",
            "subtalker_top_p",
        ):
            if sp.HasField(name):
                overrides[name] = getattr(sp, name)
        if sp.HasField("greedy") and sp.greedy:
            overrides.update(do_sample=False, subtalker_do_sample=False)
        try:
            if base is not None:
                return dataclasses.replace(base, **overrides).validated()
            return SamplingParams.from_generation_config(ckpt.generation_config, **overrides)
        except InvalidInputError as e:
            raise with_field_prefix(e, prefix) from None

    @staticmethod
    def official_non_streaming_default(voice: VoicePrompt) -> bool:
        """The official package's default layout for a whole-text call (see
        ``model.prompt.default_non_streaming_mode``)."""
        return default_non_streaming_mode(voice)

    def check_seed(self, seed: int | None, *, field: str) -> None:
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise InvalidInputError(f"{seed} is out of range: 0 <= seed <= {MAX_SEED}", field=field)

    def check_key(self, key: str, *, field: str) -> None:
        """Utterance keys and flush client ids: short, printable, no surprises in logs."""
        limit = self.config.max_utterance_key_chars
        if len(key) > limit:
            raise InvalidInputError(
                f"has {len(key)} characters; at most {limit} (max_utterance_key_chars)", field=field
            )
        if key and not all(c.isalnum() or c in "-_.:/@" for c in key):
            raise InvalidInputError("may hold only letters, digits and - _ . : / @", field=field)

    def open_session(
        self,
        voice: VoicePrompt,
        language: str,
        params: SamplingParams,
        *,
        seed: int | None,
        first_packet_frames: int | None = None,
        packet_frames: int | None = None,
        packet_policy: str | None = None,
        max_packet_frames: int | None = None,
        non_streaming_mode: bool = False,
        prefix: str = "config.",
    ) -> Session:
        self.check_ready()
        self.check_seed(seed, field=f"{prefix}seed")
        try:
            return self.require_engine().open_session(
                voice,
                language or "auto",
                params,
                seed=seed,
                first_packet_frames=first_packet_frames,
                packet_frames=packet_frames,
                packet_policy=packet_policy,
                max_packet_frames=max_packet_frames,
                non_streaming_mode=non_streaming_mode,
            )
        except InvalidInputError as e:
            raise with_field_prefix(e, prefix) from None

    async def session_from_config(
        self, cfg: pb.StreamConfig, *, whole_text: bool | None = None
    ) -> tuple[Session, OutputFormat]:
        """A session for ``cfg``. Layout: ``cfg.non_streaming_mode`` if set, else
        ``whole_text`` if given (None: the official default of the voice kind, for calls
        that take the whole text at once), else dual-track."""
        self.check_ready()
        fmt = output_format(cfg.sample_rate_hz, cfg.encoding)
        params = self.sampling(cfg.sampling)
        self.check_instruct(cfg.instruct, field="config.instruct")
        voice = await self.voice_from_config(cfg)
        seed = cfg.seed if cfg.HasField("seed") else None
        if cfg.HasField("non_streaming_mode"):
            layout = cfg.non_streaming_mode
        else:
            layout = self.official_non_streaming_default(voice) if whole_text is None else whole_text
        session = self.open_session(
            voice,
            cfg.language,
            params,
            seed=seed,
            first_packet_frames=cfg.first_packet_frames or None,
            packet_frames=cfg.packet_frames or None,
            packet_policy=wire_packet_policy(cfg.packet_policy),
            max_packet_frames=cfg.max_packet_frames or None,
            non_streaming_mode=layout,
        )
        return session, fmt

    async def utterance_options(
        self, o: pb.UtteranceOptions, session: Session, *, prefix: str = "begin.options."
    ) -> UtteranceOptions:
        """Per-utterance overrides of a BeginUtterance (validated against the session)."""
        voice = None
        which = o.WhichOneof("voice")
        instruct = o.instruct if o.HasField("instruct") else None
        if instruct is not None:
            self.check_instruct(instruct, field=f"{prefix}instruct")
        if which == "voice_id":
            prompt = await self.stored_prompt(o.voice_id, field=f"{prefix}voice_id")
            voice = voice_prompt(self.checkpoint, clone=prompt, instruct=instruct)
        elif which == "speaker":
            voice = voice_prompt(self.checkpoint, speaker=o.speaker, instruct=instruct)
        elif instruct is not None:  # a new description / style for the stream's voice
            base = session.voice
            if base.speaker is not None:
                voice = voice_prompt(self.checkpoint, speaker=base.speaker, instruct=instruct)
            elif base.speaker_embedding is None:
                voice = voice_prompt(self.checkpoint, instruct=instruct)
            else:
                raise InvalidInputError("is not supported with a cloned voice", field=f"{prefix}instruct")
        seed = o.seed if o.HasField("seed") else None
        self.check_seed(seed, field=f"{prefix}seed")
        params = None
        if o.HasField("sampling"):
            params = self.sampling(o.sampling, prefix=f"{prefix}sampling.", base=session.spec.params)
        opts = UtteranceOptions(
            voice=voice,
            language=o.language if o.HasField("language") else None,
            params=params,
            seed=seed,
            non_streaming_mode=o.non_streaming_mode if o.HasField("non_streaming_mode") else None,
        )
        try:
            return self.require_engine().check_options(opts, session.spec)
        except InvalidInputError as e:
            raise with_field_prefix(e, prefix) from None
