"""One call's conversation: user turns in, the agent's replies out, barge-in, history.

    user turn ends (VAD) -> ASR            \
    typed text (data channel) --------------+-> LLM stream -> each token -> TTS stream -> track
                                               (say mode: the text itself)

Each user turn gets a number; the agent's reply to it has the same number. A reply is one
utterance of the peer's ``StreamSynthesize`` call. User speech (or typed text, or an
``interrupt`` message) while a reply is being thought of or spoken is a barge-in: the
outbound queue is dropped first (the next 20 ms frame is silent), then the TTS utterance is
cancelled and the LLM request closed. The history keeps the part of an interrupted reply
that was sent on the call: the TTS progress events map audio positions to characters spoken.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from agent import metrics
from agent.asr import ASRClient
from agent.audio_out import OUT_RATE, PacedAudioTrack, Upsampler
from agent.clock import Clock, SystemClock
from agent.config import AgentConfig
from agent.errors import TTSError, UpstreamError
from agent.llm import LLMClient
from agent.messages import (
    AgentDone,
    AgentText,
    BargeIn,
    Error,
    Latency,
    Outbound,
    Transcript,
    TurnEvent,
    VadState,
)
from agent.tts import TTS_RATE, TTSAudio, TTSClient, TTSDone, TTSProgress, TTSStream
from agent.vad import SpeechEnded, SpeechStarted, StateChanged, VadEvent

log = logging.getLogger(__name__)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 1)


@dataclass
class Reply:
    """The agent's reply to user turn ``turn``."""

    turn: int
    input: str  # voice | text
    user_ended_at: float  # last voiced frame, or the typed text's arrival
    vad_stop_s: float | None = None  # last voiced frame -> end-of-turn decision
    asr_s: float | None = None
    llm_sent_at: float | None = None
    first_token_at: float | None = None  # first LLM token (say mode: the text) handed to the TTS
    first_audio_at: float | None = None
    audio: bytes = field(default=b"", repr=False)  # the user's speech (voice turns), for the ASR
    key: str | None = None  # its utterance on the TTS stream
    text: str = ""  # everything handed to the TTS
    samples: int = 0  # TTS samples received (24 kHz)
    marks: list[tuple[int, int]] = field(default_factory=list)  # (samples received, chars spoken)
    upsampler: Upsampler = field(default_factory=lambda: Upsampler(TTS_RATE, OUT_RATE))
    tts_done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    finished: bool = False
    failed: bool = False

    def played_text(self, sent_48k: int) -> str:
        """The text spoken in the first ``sent_48k`` samples sent on the call."""
        played = sent_48k * TTS_RATE // OUT_RATE
        chars = 0
        for samples, c in self.marks:
            if samples > played:
                break
            chars = c
        return self.text[:chars]


class Conversation:
    def __init__(
        self,
        config: AgentConfig,
        *,
        tts: TTSClient,
        track: PacedAudioTrack,
        send: Callable[[Outbound], None],
        llm: LLMClient | None = None,
        asr: ASRClient | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.tts = tts
        self.track = track
        self.send = send
        self.llm = llm
        self.asr = asr
        self.clock = clock or SystemClock()
        track.on_first_audio = self._on_first_audio
        track.on_stopped = self._on_stopped
        self.history: list[dict[str, str]] = []  # user/assistant messages (no system prompt)
        self._turn_ids = itertools.count(1)
        self._voice_turn: int | None = None  # the user turn being spoken now
        self._reply: Reply | None = None  # the reply being thought of or spoken
        self._replies: dict[int, Reply] = {}  # by turn, until finished
        self._by_key: dict[str, Reply] = {}  # by TTS utterance key, until its utterance_done
        self._stream: TTSStream | None = None
        self._reader: asyncio.Task[None] | None = None
        self._stopping: list[int] = []  # interrupted turns whose audio stop is not reported yet
        # Speech of a voice turn interrupted before its transcript came back: the user was
        # not done (a pause longer than the stop hysteresis). It goes to the ASR again,
        # in front of the next voice turn's speech.
        self._unheard: bytes = b""
        self._closed = False

    # ------------------------------------------------------------------ inputs

    @property
    def speaking(self) -> bool:
        """The agent holds the floor: a reply is in progress or its audio is still going out."""
        return self._reply is not None or self.track.audible

    def on_vad(self, events: list[VadEvent]) -> None:
        for ev in events:
            if isinstance(ev, StateChanged):
                self.send(VadState(ev.state.value))
            elif isinstance(ev, SpeechStarted):
                self._voice_turn = next(self._turn_ids)
                self.send(TurnEvent("start", self._voice_turn))
                if self.speaking:
                    self.barge_in(ev.at)
            elif isinstance(ev, SpeechEnded):
                turn = self._voice_turn if self._voice_turn is not None else next(self._turn_ids)
                self._voice_turn = None
                self.send(TurnEvent("end", turn, speech_ms=round(ev.speech_s * 1000.0, 1)))
                if self.asr is None:
                    continue  # turn-taking and barge-in only: nothing to transcribe with
                audio, self._unheard = self._unheard + ev.audio, b""
                reply = Reply(
                    turn, "voice", ev.last_speech_at, vad_stop_s=ev.at - ev.last_speech_at, audio=audio
                )
                self._start(reply)

    def on_user_text(self, text: str) -> None:
        now = self.clock.now()
        if self.speaking:
            self.barge_in(now)
        self._unheard = b""
        self._start(Reply(next(self._turn_ids), "text", now), text=text)

    def barge_in(self, decided_at: float | None = None) -> None:
        """Stop the agent now: silence from the next frame, TTS utterance cancelled, LLM
        request closed; the history keeps what was sent."""
        decided_at = self.clock.now() if decided_at is None else decided_at
        reply = self._reply
        audible = self.track.audible
        self.track.clear(decided_at)  # first: the next frame sent is silent
        if reply is None:
            return
        if audible:
            self._stopping.append(reply.turn)
        self._reply = None
        if self._stream is not None and reply.key is not None and not reply.tts_done.is_set():
            self._stream.cancel(reply.key)
        if reply.key is not None:
            self._by_key.pop(reply.key, None)
        if reply.input == "voice" and reply.asr_s is None:
            self._unheard = reply.audio  # not transcribed yet: transcribed with the next turn
        if reply.task is not None:
            reply.task.cancel()  # closes the LLM request (or the ASR one)
        metrics.BARGE_INS.inc()
        self._finish(reply, interrupted=True)

    # ------------------------------------------------------------------ replies

    def _start(self, reply: Reply, *, text: str | None = None) -> None:
        if self._closed:
            return
        if self._reply is not None:  # the newest input wins
            self.barge_in()
        self._reply = reply
        self._replies[reply.turn] = reply
        reply.task = asyncio.create_task(self._respond(reply, text), name=f"reply-{reply.turn}")

    async def _respond(self, reply: Reply, text: str | None) -> None:
        """Transcribe (voice turns), think (LLM) and speak; finishes the reply unless a
        barge-in does first (then this task is cancelled)."""
        try:
            if text is None:
                assert self.asr is not None
                t0 = self.clock.now()
                text = await self.asr.transcribe(reply.audio)
                reply.asr_s = self.clock.now() - t0
                metrics.ASR_LATENCY.observe(reply.asr_s)
            self.send(Transcript(reply.turn, text, reply.input))
            if not text:
                self._finish(reply, interrupted=False, outcome="empty")
                return
            self._add_user(text)
            stream = self._tts_stream()
            reply.key = f"turn-{reply.turn}"
            self._by_key[reply.key] = reply
            stream.begin(reply.key)
            try:
                if self.llm is not None:
                    await self._llm_to_tts(reply, stream)
                else:
                    self._to_tts(reply, stream, text)
            finally:
                if not stream.closed:
                    stream.flush(reply.key)
            if not reply.text.strip():
                self._finish(reply, interrupted=False, outcome="empty")
                return
            await reply.tts_done.wait()
            await self.track.playback(reply.turn).drained.wait()
            self._finish(reply, interrupted=reply.failed, outcome="failed" if reply.failed else None)
        except asyncio.CancelledError:
            raise
        except UpstreamError as e:
            self._error(e)
            self._finish(reply, interrupted=True, outcome="failed")
        except Exception as e:  # a bug: report it on the call, keep the call alive
            log.exception("reply %d failed", reply.turn)
            self.send(Error(f"internal error: {type(e).__name__}"))
            self._finish(reply, interrupted=True, outcome="failed")

    def _to_tts(self, reply: Reply, stream: TTSStream, delta: str) -> None:
        if reply.first_token_at is None:
            reply.first_token_at = self.clock.now()
        reply.text += delta
        stream.text(delta)
        self.send(AgentText(reply.turn, delta))

    async def _llm_to_tts(self, reply: Reply, stream: TTSStream) -> None:
        assert self.llm is not None
        reply.llm_sent_at = self.clock.now()
        try:
            async for delta in self.llm.stream(self._messages()):
                if not reply.text:
                    delta = delta.lstrip()  # leading blank lines would be spoken as silence
                    if not delta:
                        continue
                    metrics.LLM_FIRST_TOKEN.observe(self.clock.now() - reply.llm_sent_at)
                self._to_tts(reply, stream, delta)
        except UpstreamError as e:
            if not reply.text:
                raise
            self._error(e)  # speak what came before the failure
            reply.failed = True

    def _finish(self, reply: Reply, *, interrupted: bool, outcome: str | None = None) -> None:
        if reply.finished:
            return
        reply.finished = True
        if self._reply is reply:
            self._reply = None
        self._replies.pop(reply.turn, None)
        kept = reply.played_text(self.track.sent_samples(reply.turn)) if interrupted else reply.text
        kept = kept.strip()
        if kept:
            self.history.append({"role": "assistant", "content": kept})
        self.track.forget(reply.turn)
        metrics.TURNS.labels(reply.input, outcome or ("interrupted" if interrupted else "completed")).inc()
        self.send(AgentDone(reply.turn, interrupted, kept))

    def _add_user(self, text: str) -> None:
        # Consecutive user messages (an earlier reply said nothing) are merged: many chat
        # templates require user and assistant to alternate.
        if self.history and self.history[-1]["role"] == "user":
            self.history[-1]["content"] += "\n" + text
        else:
            self.history.append({"role": "user", "content": text})
        excess = len(self.history) - self.config.llm.history_messages
        if excess > 0:
            del self.history[:excess]
            while self.history and self.history[0]["role"] != "user":
                del self.history[0]

    def _messages(self) -> list[dict[str, str]]:
        system = self.config.llm.system_prompt
        return ([{"role": "system", "content": system}] if system else []) + [dict(m) for m in self.history]

    def _error(self, e: UpstreamError) -> None:
        log.warning("%s: %s", e.service, e)
        metrics.ERRORS.labels(e.service).inc()
        self.send(Error(str(e), e.service))

    # ------------------------------------------------------------------ the TTS stream

    def _tts_stream(self) -> TTSStream:
        if self._stream is None:
            self._stream = self.tts.open()
            self._reader = asyncio.create_task(self._read(self._stream), name="tts-reader")
        return self._stream

    async def _read(self, stream: TTSStream) -> None:
        try:
            async for ev in stream.events():
                reply = self._by_key.get(ev.key)
                if reply is None:
                    continue  # an interrupted reply's last words, or an empty utterance
                if isinstance(ev, TTSAudio):
                    reply.samples += len(ev.pcm) // 2
                    self.track.push(reply.turn, reply.upsampler.push(ev.pcm))
                elif isinstance(ev, TTSProgress):
                    reply.marks.append((reply.samples, ev.chars_consumed))
                elif isinstance(ev, TTSDone):
                    self._tts_done(reply)
        except TTSError as e:
            self._error(e)
        finally:
            if self._stream is stream:
                self._stream = None  # the next reply opens a new call
            for reply in list(self._by_key.values()):  # whatever was in flight has ended
                reply.failed = True
                self._tts_done(reply)

    def _tts_done(self, reply: Reply) -> None:
        if reply.key is not None:
            self._by_key.pop(reply.key, None)
        if not reply.finished:
            self.track.push(reply.turn, reply.upsampler.flush())
            self.track.end(reply.turn)
        reply.tts_done.set()

    # ------------------------------------------------------------------ track callbacks

    def _on_first_audio(self, turn: int, sent_at: float) -> None:
        reply = self._replies.get(turn)
        if reply is None or reply.first_audio_at is not None:
            return
        reply.first_audio_at = sent_at
        response = sent_at - reply.user_ended_at
        metrics.RESPONSE_LATENCY.labels(reply.input).observe(response)
        token_to_audio = None if reply.first_token_at is None else sent_at - reply.first_token_at
        if token_to_audio is not None:
            metrics.FIRST_TOKEN_TO_AUDIO.labels("llm" if self.llm else "say").observe(token_to_audio)
        llm_first = (
            None
            if reply.llm_sent_at is None or reply.first_token_at is None
            else reply.first_token_at - reply.llm_sent_at
        )
        self.send(
            Latency(
                turn=turn,
                input=reply.input,
                response_ms=round(response * 1000.0, 1),
                vad_stop_ms=_ms(reply.vad_stop_s),
                asr_ms=_ms(reply.asr_s),
                llm_first_token_ms=_ms(llm_first),
                token_to_audio_ms=_ms(token_to_audio),
            )
        )

    def _on_stopped(self, decided_at: float, stopped_at: float) -> None:
        stop = stopped_at - decided_at
        metrics.BARGE_IN_STOP.observe(max(stop, 0.0))
        for turn in self._stopping:
            self.send(BargeIn(turn, round(stop * 1000.0, 2)))
        self._stopping.clear()

    # ------------------------------------------------------------------ shutdown

    async def close(self) -> None:
        """Stop everything of this call. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        tasks = [r.task for r in self._replies.values() if r.task is not None]
        self._replies.clear()
        self._reply = None
        if self._stream is not None:
            self._stream.abort()
        if self._reader is not None:
            tasks.append(self._reader)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
