"""The streaming engine: the device loop around the session table.

``Engine`` owns the model and the one thread that touches the device. Callers (gRPC
handlers on an asyncio loop, CLIs, tests) talk to it only through ``Session`` methods,
which validate, enqueue a typed command and return at once, through each session's
output ``Channel``, and through ``submit`` for other device work (voice cloning
encoders, warm-up). Every loop iteration applies the queued commands to the
``SessionTable`` (``engine/core.py``: all session and utterance rules, no tensors), runs
at most one submitted job, then one ``FrameGenerator.tick`` over every runnable
utterance (one batched talker step + batched code-predictor steps) and decodes the new
frames in one batched step of the streaming decoder (each utterance's decoder state
lives in its slot of a ``DecoderPool``).

On CUDA the steps run the fast path by default (static KV cache, batch buckets, CUDA
graphs captured by ``warmup()``): see ``EngineConfig`` and ``model/cuda_graphs.py``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from qwen3tts_rt.engine import core
from qwen3tts_rt.engine.channel import Channel
from qwen3tts_rt.engine.core import SessionSpec, SessionTable, TableLimits, Utterance, UtteranceOptions
from qwen3tts_rt.engine.generation import (
    FinishReason,
    FrameCap,
    FrameGenerator,
    Phase,
    UtteranceState,
    run_isolated,
)
from qwen3tts_rt.engine.incremental_tokenizer import IncrementalTokenizer, merge_index
from qwen3tts_rt.engine.messages import EngineMessage, SessionClosed, SessionError
from qwen3tts_rt.engine.packets import PacketPolicy, PacketSettingError
from qwen3tts_rt.engine.synth import new_utterance
from qwen3tts_rt.errors import InvalidInputError, UnavailableError
from qwen3tts_rt.model.checkpoint import Checkpoint
from qwen3tts_rt.model.cuda_graphs import DEFAULT_MAX_POSITIONS, FastPath
from qwen3tts_rt.model.decoder_pool import DecoderPool
from qwen3tts_rt.model.prompt import VoicePrompt, check_voice, resolve_language
from qwen3tts_rt.model.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "Session", "UtteranceOptions"]

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class EngineConfig:
    max_sessions: int = 16  # live sessions (each holds one talker KV slot)
    # Packets (engine/packets.py): the first packet of an utterance has first_packet_frames
    # frames (80 ms each); later ones, 'fixed': packet_frames each; 'adaptive': frames are
    # held back and decoded together (up to max_packet_frames) while the listener is ahead
    # by more than the packet plus packet_margin_s, or waits anyway on a slow stream.
    first_packet_frames: int = 1
    packet_policy: str = "adaptive"
    packet_frames: int = 1
    max_packet_frames: int = 8
    packet_margin_s: float = 0.25
    max_utterance_chars: int = 20_000  # text per utterance
    # Backpressure: a session with this many unread packets in its output channel is not
    # stepped until its client reads (memory per session stays bounded; the others go on).
    max_buffered_packets: int = 256
    max_pending_utterances: int = 32  # utterances queued by flushes, the speaking one included
    frame_cap: FrameCap = field(
        default_factory=FrameCap
    )  # frames per utterance: base + per_token * text tokens
    idle_wait_s: float = 0.02  # worker wait when nothing can move
    # Device jobs (``Engine.submit``: cloning encoders) run between ticks, one per tick, but
    # not while a stream waits for its first packet, unless the job has waited this long.
    max_job_wait_s: float = 0.5
    # Tokens inside an unfinished word / CJK run go out as soon as their BPE boundary is
    # proven final (engine/incremental_tokenizer.py); False: only whole pieces (for comparisons).
    eager_tokenizer: bool = True
    # --- the fast path (model/cuda_graphs.py). None: on for CUDA, off on CPU.
    static_kv: bool | None = None  # preallocated KV caches, steps padded to batch buckets
    cuda_graphs: bool | None = None  # replay the bucketed steps as CUDA graphs (CUDA + static_kv only)
    max_positions: int = DEFAULT_MAX_POSITIONS  # talker positions per slot in the static cache
    batch_buckets: tuple[int, ...] = ()  # () = 1, 2, 4, ... up to max_sessions
    attention: str = "auto"  # 'auto' (flash-attn when usable, else SDPA), 'sdpa' or 'flash'

    def validated(self) -> EngineConfig:
        self.packets().validated()
        for name in (
            "max_sessions",
            "max_utterance_chars",
            "max_buffered_packets",
            "max_pending_utterances",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1")
        if self.attention not in ("auto", "sdpa", "flash"):
            raise ValueError("EngineConfig.attention must be 'auto', 'sdpa' or 'flash'")
        if any(b < 1 for b in self.batch_buckets):
            raise ValueError("EngineConfig.batch_buckets must be positive")
        return self

    def packets(self, frame_s: float = 0.08) -> PacketPolicy:
        return PacketPolicy(
            policy=self.packet_policy,
            first_packet_frames=self.first_packet_frames,
            packet_frames=self.packet_frames,
            max_packet_frames=self.max_packet_frames,
            margin_s=self.packet_margin_s,
            frame_s=frame_s,
        )

    @property
    def limits(self) -> TableLimits:
        return TableLimits(
            max_sessions=self.max_sessions,
            max_pending_utterances=self.max_pending_utterances,
            max_utterance_chars=self.max_utterance_chars,
            max_buffered_packets=self.max_buffered_packets,
        )

    def fast_path(self, device: torch.device) -> FastPath:
        return FastPath.resolve(
            device,
            static=self.static_kv,
            cuda_graphs=self.cuda_graphs,
            max_positions=self.max_positions,
            buckets=self.batch_buckets,
            attention=self.attention,
        )


class Session:
    """One client stream. Thread-safe; every method returns immediately."""

    def __init__(self, engine: Engine, sid: int, spec: SessionSpec) -> None:
        self.engine = engine
        self.id = sid
        self.spec = spec
        self.out: Channel[EngineMessage] = Channel()
        self.opened_at = time.perf_counter()

    @property
    def voice(self) -> VoicePrompt:
        v: VoicePrompt = self.spec.voice
        return v

    def push_text(self, delta: str) -> None:
        """A text delta of the current utterance (raw: the engine cleans it)."""
        self.engine._put(core.Text(self.id, delta, time.perf_counter()))

    def begin(self, key: str = "", options: UtteranceOptions | None = None) -> None:
        """Start a named utterance with its own settings (validated here: raises
        ``InvalidInputError``); the current one is flushed first if it has text or a name."""
        opts = self.engine.check_options(options or UtteranceOptions(), self.spec)
        self.engine._put(core.Begin(self.id, key, opts))

    def flush(self, client_id: str = "") -> None:
        """End the current utterance; later text starts the next one."""
        self.engine._put(core.Flush(self.id, client_id))

    def cancel(self, key: str | None = None) -> None:
        """Barge-in: stop speaking within one frame and drop queued audio; with ``key``,
        only the utterances with that key."""
        self.engine._put(core.Cancel(self.id, key))

    def end_text(self) -> None:
        """End of text: finish speaking, then the session closes."""
        self.engine._put(core.End(self.id))

    def close(self) -> None:
        """Drop everything and free the slot (client went away). Safe to call twice."""
        self.engine._put(core.Close(self.id))

    def messages(self, timeout: float | None = None) -> Iterator[EngineMessage]:
        """Blocking iterator over output messages until the session closes."""
        while True:
            msg = self.out.get(timeout)
            yield msg
            if isinstance(msg, (SessionClosed, SessionError)):
                return


class _DeviceBackend:
    """The table's device side: generation state in a generator slot, decoder state in
    the same slot of the decoder pool."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def start(self, u: Utterance) -> None:
        e = self.engine
        assert u.slot is not None
        u.handle = new_utterance(
            e.ckpt,
            u.voice,
            u.language,
            u.params,
            seed=u.seed,
            slot=u.slot,
            non_streaming_mode=u.non_streaming_mode,
        )
        e._dec.reset(u.slot)
        if u.voice.ref_codes is not None:  # continue the audio of the reference
            e._dec.prime(u.slot, u.voice.ref_codes)

    def push(self, u: Utterance, ids: list[int]) -> None:
        u.handle.sched.push(ids)

    def end(self, u: Utterance) -> None:
        st: UtteranceState = u.handle
        st.sched.end()
        st.max_frames = self.engine.config.frame_cap.frames(u.params, len(u.ids))

    def release(self, u: Utterance) -> None:
        if u.handle is not None:
            u.handle.phase = Phase.DONE

    def consumed(self, u: Utterance) -> int:
        st: UtteranceState = u.handle
        return st.sched.text_tokens_consumed(st.positions_consumed)


class Engine:
    def __init__(
        self,
        ckpt: Checkpoint,
        config: EngineConfig | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """``clock``: the session table's (latency stamps, the listener's playback that
        adaptive packets follow); tests pass a deterministic one."""
        self.ckpt = ckpt
        self.config = (config or EngineConfig()).validated()
        self.fast = self.config.fast_path(ckpt.model.device)
        self._gen = FrameGenerator(ckpt.model, self.config.max_sessions, self.fast)
        codec = ckpt.codec
        self._dec = DecoderPool(codec.decoder, self.config.max_sessions, self.fast, codec.device, codec.dtype)
        self._packets = self.config.packets(codec.decoder.samples_per_frame / codec.sample_rate).validated()
        self.table = SessionTable(
            self.config.limits,
            _DeviceBackend(self),
            lambda: IncrementalTokenizer(ckpt.tokenizer, eager=self.config.eager_tokenizer),
            sample_rate=codec.sample_rate,
            clock=clock,
        )
        if self.config.eager_tokenizer:
            merge_index(ckpt.tokenizer)  # built once now, not on the device thread at the first text
        self._commands: queue.SimpleQueue[core.Command] = queue.SimpleQueue()
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = (
            queue.SimpleQueue()
        )
        self._job: tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None = None  # next to run
        self._job_since = 0.0  # when it became the next job
        self._wake = threading.Event()
        self._sids = itertools.count(1)
        self._stop = threading.Event()
        # Observer called on the worker thread after each tick that moved: (batch size, seconds).
        self.on_tick: Callable[[int, float], None] | None = None
        # Observer of each decoder call (frames per slot, slots, seconds), on the worker thread.
        self.on_decode: Callable[[int, int, float], None] | None = None
        self._thread = threading.Thread(target=self._run, name="qwen3tts-device", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public

    @property
    def live_sessions(self) -> int:
        return self.table.live

    @property
    def free_slots(self) -> int:
        """Generation slots not held by an utterance (``max_sessions`` when idle). Read from
        another thread it is a snapshot: the worker may take or free a slot meanwhile."""
        return len(self.table.free_slots)

    def check_options(self, o: UtteranceOptions, spec: SessionSpec) -> UtteranceOptions:
        """Validate per-utterance overrides against the checkpoint (raises InvalidInputError)."""
        voice = o.voice if o.voice is not None else spec.voice
        language = o.language if o.language is not None else spec.language
        check_voice(self.ckpt.model, voice)
        resolve_language(self.ckpt.model, language, voice.speaker)
        params = o.params.validated() if o.params is not None else None
        return UtteranceOptions(
            voice=o.voice,
            language=o.language,
            params=params,
            seed=o.seed,
            non_streaming_mode=o.non_streaming_mode,
        )

    def open_session(
        self,
        voice: VoicePrompt,
        language: str = "auto",
        params: SamplingParams | None = None,
        *,
        seed: int | None = None,
        first_packet_frames: int | None = None,
        packet_frames: int | None = None,
        packet_policy: str | None = None,
        max_packet_frames: int | None = None,
        non_streaming_mode: bool = False,
    ) -> Session:
        """Validate the request and open a session; raises InvalidInputError on bad
        input and CapacityError when ``max_sessions`` sessions are live. Packet settings
        left None are the engine's; a ``packet_frames`` given without a policy asks for
        fixed packets of that size."""
        check_voice(self.ckpt.model, voice)
        resolve_language(self.ckpt.model, language, voice.speaker)
        params = (params or SamplingParams.from_generation_config(self.ckpt.generation_config)).validated()
        if packet_policy is None and packet_frames is not None:
            packet_policy = "fixed"
        base = self._packets
        packets = dataclasses.replace(
            base,
            policy=base.policy if packet_policy is None else packet_policy,
            first_packet_frames=base.first_packet_frames
            if first_packet_frames is None
            else first_packet_frames,
            packet_frames=base.packet_frames if packet_frames is None else packet_frames,
            max_packet_frames=base.max_packet_frames if max_packet_frames is None else max_packet_frames,
        )
        try:
            packets.validated()
        except PacketSettingError as e:
            raise InvalidInputError(str(e), field=e.setting) from None
        self._check_running()
        self.table.reserve()
        spec = SessionSpec(voice, language, params, seed, packets, non_streaming_mode)
        s = Session(self, next(self._sids), spec)
        self._put(core.Open(s.id, spec, s.out))
        return s

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run ``fn`` on the device thread, between two ticks (one job per tick, so that
        streams keep moving while jobs queue, and none while a stream waits for its first
        packet: see ``max_job_wait_s``); its result or exception in the future."""
        self._check_running()
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((fn, fut))
        self._wake.set()
        return fut

    def warmup(self, timeout: float | None = None) -> None:
        """Capture the CUDA graphs of every batch bucket (talker step, code predictor,
        decoder) on the device thread; blocks until done. Call it before reporting SERVING:
        a bucket first met without it is captured then, stalling that tick. Nothing to do
        on the eager paths (CPU). Safe to call twice."""

        p = self._packets
        longest = max(
            p.first_packet_frames, p.packet_frames, p.max_packet_frames if p.policy == "adaptive" else 1
        )

        def capture() -> None:
            self._gen.warmup()
            self._dec.warmup(range(1, longest + 1))

        fut = self.submit(capture)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fut.result(0.1)
                return
            except concurrent.futures.TimeoutError:
                if self._stop.is_set() or not self._thread.is_alive():
                    raise RuntimeError("the engine stopped before its warm-up finished") from None
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"warm-up took more than {timeout} s") from None

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the worker; sessions still open get a SessionError. Safe to call twice."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker side

    def _check_running(self) -> None:
        if self._stop.is_set() or not self._thread.is_alive():
            raise UnavailableError("the engine has stopped; see the server log")

    def _put(self, cmd: core.Command) -> None:
        self._commands.put(cmd)
        self._wake.set()

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while not self._stop.is_set():
                self._drain()
                self._run_one_job()
                if not self._tick():
                    self._wake.wait(self.config.idle_wait_s)
                    self._wake.clear()
        except Exception:  # pragma: no cover - a bug in the worker itself
            log.exception("device worker crashed")
            self.table.shutdown("the device worker stopped; see the server log", kind="internal")
        finally:
            self.table.shutdown("server shutting down")
            while True:
                try:
                    _, fut = self._jobs.get_nowait()
                except queue.Empty:
                    break
                fut.set_exception(UnavailableError("the engine has stopped"))
            if self._job is not None:
                self._job[1].set_exception(UnavailableError("the engine has stopped"))
                self._job = None

    def _drain(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            self.table.apply(cmd)

    def _run_one_job(self) -> None:
        """Run the next submitted job, unless a stream waits for its first packet (then the
        job waits, at most ``max_job_wait_s``): first audio never queues behind clonings."""
        if self._job is None:
            try:
                self._job = self._jobs.get_nowait()
            except queue.Empty:
                return
            self._job_since = time.monotonic()
        waited = time.monotonic() - self._job_since
        if waited < self.config.max_job_wait_s and self.table.first_packet_pending():
            return
        (fn, fut), self._job = self._job, None
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except BaseException as e:  # handed to the caller
            fut.set_exception(e)

    def _decode(self, due: list[tuple[Utterance, np.ndarray]], failed: dict[int, str]) -> None:
        """Decode the held frames of ``due`` (codes [t, G] each) and hand each utterance its
        packet; slots with the same t are decoded in one batched call."""
        by_t: dict[int, list[tuple[Utterance, np.ndarray]]] = {}
        for row in due:
            by_t.setdefault(len(row[1]), []).append(row)

        def decode(rows: list[tuple[Utterance, np.ndarray]]) -> list[np.ndarray]:
            t0 = time.perf_counter()
            codes = torch.from_numpy(np.stack([c for _, c in rows]))  # [n, t, G]
            slots = [u.slot for u, _ in rows]
            assert None not in slots
            pcm = list(self._dec.step(slots, codes).float().cpu().numpy())  # type: ignore[arg-type]
            if self.on_decode is not None:
                self.on_decode(codes.shape[1], len(rows), time.perf_counter() - t0)
            return pcm

        def decode_failed(row: tuple[Utterance, np.ndarray], e: Exception) -> None:
            log.error("decoding %d frames of slot %s failed", len(row[1]), row[0].slot, exc_info=e)
            failed[row[0].sid] = f"decoding failed: {type(e).__name__}: {e}"

        for rows in by_t.values():
            for (u, _), pcm in run_isolated(rows, decode, decode_failed):
                try:
                    self.table.on_decoded(u, pcm)
                except Exception as e:
                    log.exception("emitting audio of session %d failed", u.sid)
                    failed[u.sid] = f"emitting audio failed: {type(e).__name__}: {e}"

    def _tick(self) -> bool:
        """One generation tick over every runnable utterance; True if anything moved."""
        live = self.table.runnable()
        if not live:
            return self._job is not None or not self._jobs.empty()
        states: list[UtteranceState] = [u.handle for u in live]
        phases = [st.phase for st in states]
        t0 = time.perf_counter()
        try:
            produced = self._gen.tick(states)
        except Exception as e:
            log.exception("generation step failed")
            for u in live:
                self.table.fail(u.sid, f"generation failed: {type(e).__name__}: {e}")
            return True
        by_state = {id(u.handle): u for u in live}
        failed: dict[int, str] = {}  # session id -> message: faults of one session end only it
        for st, frame in produced:
            self.table.on_frame(by_state[id(st)], frame.numpy().astype(np.int64))
        finishing = [
            u
            for u, st in zip(live, states)
            if st.phase is Phase.DONE and st.finish is not None and st.finish is not FinishReason.ERROR
        ]
        self._decode(self.table.to_decode(finishing), failed)
        elapsed = time.perf_counter() - t0
        moved = bool(produced) or any(st.phase is not ph for st, ph in zip(states, phases))
        if moved:
            for u in live:
                u.compute_s += elapsed / len(live)
            if self.on_tick is not None:
                self.on_tick(len(live), elapsed)
        for u, st in zip(live, states):
            if st.finish is FinishReason.ERROR:
                failed.setdefault(u.sid, f"generation failed: {type(st.error).__name__}: {st.error}")
            if u.sid in failed:
                self.table.fail(u.sid, failed.pop(u.sid))
            elif st.phase is Phase.DONE and st.finish is not None and u.handle is st:
                self.table.on_finished(u, st.finish.value)
        return moved
