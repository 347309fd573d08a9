"""The conversation loop with a scripted TTS stream (the real one is exercised by
test_agent_call.py), the outbound track on a manual clock and an LLM stub over real HTTP:
tokens go to the TTS as they arrive, barge-in cancels the TTS utterance and the LLM request,
and the history keeps only what was sent on the call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import numpy as np
import pytest

from agent.asr import ASRClient
from agent.audio_out import FRAME_SAMPLES, PacedAudioTrack
from agent.config import AgentConfig, ASRConfig, LLMConfig
from agent.conversation import Conversation
from agent.errors import TTSError
from agent.llm import LLMClient
from agent.messages import AgentDone, AgentText, BargeIn, Error, Latency, Outbound, Transcript
from agent.tts import TTSAudio, TTSDone, TTSEvent, TTSProgress
from agent.vad import SpeechEnded, SpeechStarted
from tests.agent_helpers import ASRStub, LLMStub, ManualClock, wav_seconds

TOKENS = ["Sure", ",", " the", " weather", " is", " sunny", "."]
CHUNK = 1920  # one 80 ms codec frame at 24 kHz


class FakeStream:
    """Stands in for ``agent.tts.TTSStream``: records requests and yields whatever the test
    puts in ``events``."""

    def __init__(self) -> None:
        self.requests: list[tuple[Any, ...]] = []
        self.closed = False
        self.queue: asyncio.Queue[TTSEvent | BaseException | None] = asyncio.Queue()

    def begin(self, key: str) -> None:
        self.requests.append(("begin", key))

    def text(self, delta: str) -> None:
        self.requests.append(("text", delta))

    def flush(self, client_id: str = "") -> None:
        self.requests.append(("flush", client_id))

    def cancel(self, key: str | None = None) -> None:
        self.requests.append(("cancel", key))

    def abort(self) -> None:
        self.closed = True
        self.queue.put_nowait(None)

    async def events(self) -> AsyncIterator[TTSEvent]:
        while True:
            ev = await self.queue.get()
            if ev is None:
                return
            if isinstance(ev, BaseException):
                raise ev
            yield ev

    def texts(self) -> str:
        return "".join(r[1] for r in self.requests if r[0] == "text")

    def speak(self, key: str, text: str, pieces: list[str], done: bool = True) -> None:
        """One audio chunk per text piece, each followed by its progress (like the server)."""
        chars = 0
        uid = int(key.rsplit("-", 1)[-1])  # any number: the agent goes by the key
        for i, piece in enumerate(pieces):
            chars += len(piece)
            self.queue.put_nowait(TTSAudio(uid, (np.full(CHUNK, 1000 + i, "<i2")).tobytes(), key))
            self.queue.put_nowait(TTSProgress(uid, chars, key))
        assert chars <= len(text)
        if done:
            self.queue.put_nowait(TTSDone(uid, "eos", len(pieces), 10.0, key))


class FakeTTS:
    voice = "fake"

    def __init__(self) -> None:
        self.streams: list[FakeStream] = []

    def open(self) -> FakeStream:
        self.streams.append(FakeStream())
        return self.streams[-1]


async def until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if pred():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not met")


async def play(track: PacedAudioTrack, frames: int) -> None:
    for _ in range(frames):
        await track.recv()


class Setup:
    def __init__(self, llm_url: str | None, http: aiohttp.ClientSession) -> None:
        self.clock = ManualClock()
        self.tts = FakeTTS()
        self.track = PacedAudioTrack(self.clock)
        self.sent: list[Outbound] = []
        cfg = AgentConfig(llm=LLMConfig(url=llm_url, system_prompt="Be brief."))
        self.conv = Conversation(
            cfg,
            tts=self.tts,  # type: ignore[arg-type]
            track=self.track,
            send=self.sent.append,
            llm=LLMClient(cfg.llm, http) if llm_url else None,
            clock=self.clock,
        )

    def of(self, kind: type) -> list[Any]:
        return [m for m in self.sent if isinstance(m, kind)]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_say_mode_speaks_the_text_and_keeps_it(http: aiohttp.ClientSession) -> None:
    s = Setup(None, http)
    s.conv.on_user_text("Hello there.")
    await until(lambda: bool(s.tts.streams) and ("flush", "turn-1") in s.tts.streams[0].requests)
    stream = s.tts.streams[0]
    assert stream.requests == [("begin", "turn-1"), ("text", "Hello there."), ("flush", "turn-1")]
    assert s.conv.speaking
    s.clock.advance(0.03)  # the TTS takes 30 ms to the first audio
    stream.speak("turn-1", "Hello there.", ["Hello", " there."])
    await until(lambda: s.track.queued_samples > 0)
    await play(s.track, 9)  # 2 x 80 ms of audio = 8 frames (+ the resampler's tail)
    await until(lambda: bool(s.of(AgentDone)))
    assert s.of(AgentDone) == [AgentDone(1, False, "Hello there.")]
    assert s.conv.history == [
        {"role": "user", "content": "Hello there."},
        {"role": "assistant", "content": "Hello there."},
    ]
    (lat,) = s.of(Latency)
    assert (
        lat.input == "text"
        and lat.response_ms == pytest.approx(30.0)
        and lat.token_to_audio_ms == pytest.approx(30.0)
    )
    assert lat.llm_first_token_ms is None and lat.vad_stop_ms is None
    assert not s.conv.speaking
    await s.conv.close()
    await s.conv.close()  # twice is fine


async def test_tokens_go_to_one_tts_stream_as_they_arrive(http: aiohttp.ClientSession) -> None:
    stub = LLMStub([TOKENS, ["Fine", "."]], interval=0.03)
    s = Setup(await stub.start(), http)
    try:
        s.conv.on_user_text("Weather?")
        await until(lambda: len(s.of(AgentText)) >= 2)
        stream = s.tts.streams[0]
        assert stream.texts() == "Sure," and ("flush", "turn-1") not in stream.requests  # still writing
        await until(lambda: ("flush", "turn-1") in stream.requests)
        assert stream.texts() == "".join(TOKENS)
        assert [r[1] for r in stream.requests if r[0] == "text"] == TOKENS  # one delta per token
        assert stub.requests[0]["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather?"},
        ]
        stream.speak("turn-1", "".join(TOKENS), TOKENS)
        await until(lambda: s.track.queued_samples > 0)
        await play(s.track, 4 * len(TOKENS) + 1)
        await until(lambda: bool(s.of(AgentDone)))
        # the next reply goes on the same stream, as the next utterance
        s.conv.on_user_text("And tomorrow?")
        await until(lambda: ("flush", "turn-2") in stream.requests)
        assert len(s.tts.streams) == 1
        assert stub.requests[1]["messages"][1:] == [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "Sure, the weather is sunny."},
            {"role": "user", "content": "And tomorrow?"},
        ]
    finally:
        await s.conv.close()
        await stub.stop()


async def test_barge_in_keeps_only_what_was_sent(http: aiohttp.ClientSession) -> None:
    stub = LLMStub([TOKENS, ["Yes", "."]], interval=0.0)
    s = Setup(await stub.start(), http)
    try:
        s.conv.on_user_text("Weather?")
        stream_flushed = lambda: bool(s.tts.streams) and ("flush", "turn-1") in s.tts.streams[0].requests  # noqa: E731
        await until(stream_flushed)
        stream = s.tts.streams[0]
        stream.speak("turn-1", "".join(TOKENS), TOKENS, done=False)  # the server is still generating
        await until(lambda: s.track.queued_samples > 0)
        await play(s.track, 9)  # 180 ms sent: "Sure" and "," (2 x 80 ms) fully, " the" partly
        decided = s.clock.now() + 0.004
        s.conv.on_vad([SpeechStarted(at=decided, began_at=decided - 0.2)])
        assert s.track.queued_samples == 0  # dropped at once
        assert stream.requests[-1] == ("cancel", "turn-1")  # that reply only
        assert s.of(AgentDone) == [AgentDone(1, True, "Sure,")]
        assert s.conv.history[-1] == {"role": "assistant", "content": "Sure,"}
        await play(s.track, 1)
        (barge,) = s.of(BargeIn)
        assert barge.turn == 1 and barge.stop_ms == pytest.approx(16.0)  # the next frame's time
        # late audio of the cancelled utterance is ignored; the next reply has its own key
        stream.speak("turn-1", "".join(TOKENS), TOKENS)
        s.conv.on_user_text("Is it?")  # turn 3: the speech that barged in was turn 2
        await until(lambda: ("flush", "turn-3") in stream.requests)
        assert ("begin", "turn-3") in stream.requests
        assert s.track.queued_samples == 0
        assert stub.requests[1]["messages"][-2:] == [
            {"role": "assistant", "content": "Sure,"},
            {"role": "user", "content": "Is it?"},
        ]
    finally:
        await s.conv.close()
        await stub.stop()


async def test_barge_in_while_the_llm_writes_closes_the_request(http: aiohttp.ClientSession) -> None:
    stub = LLMStub([["word "] * 200], interval=0.02)
    s = Setup(await stub.start(), http)
    try:
        s.conv.on_user_text("Tell me a story.")
        await until(lambda: len(s.of(AgentText)) >= 3)
        s.conv.barge_in()
        stream = s.tts.streams[0]
        assert stream.requests[-1] == ("cancel", "turn-1")  # that reply only
        assert ("flush", "turn-1") not in stream.requests  # cancelled, never flushed
        await until(lambda: stub.aborted == 1)
        assert stub.tokens_sent[0] < 50
        assert s.of(AgentDone) == [AgentDone(1, True, "")]  # nothing was played
        assert s.of(BargeIn) == []  # no audio was playing: nothing to stop
        # nothing played: the next user message is merged into the unanswered one
        s.conv.on_user_text("A short one.")
        await until(lambda: len(stub.requests) == 2)
        assert stub.requests[1]["messages"][1:] == [
            {"role": "user", "content": "Tell me a story.\nA short one."}
        ]
    finally:
        await s.conv.close()
        await stub.stop()


async def test_a_failed_tts_stream_is_reported_and_replaced(http: aiohttp.ClientSession) -> None:
    s = Setup(None, http)
    s.conv.on_user_text("One.")
    await until(lambda: bool(s.tts.streams) and len(s.tts.streams[0].requests) == 3)
    s.tts.streams[0].queue.put_nowait(TTSError("UNAVAILABLE: server went away"))
    await until(lambda: bool(s.of(AgentDone)))
    assert s.of(Error) == [Error("UNAVAILABLE: server went away", "tts")]
    assert s.of(AgentDone) == [AgentDone(1, True, "")]
    s.conv.on_user_text("Two.")
    await until(lambda: len(s.tts.streams) == 2)
    assert s.tts.streams[1].requests == [("begin", "turn-2"), ("text", "Two."), ("flush", "turn-2")]
    assert s.of(Transcript)[-1] == Transcript(2, "Two.", "text")
    await s.conv.close()


async def test_audio_frames_follow_the_tts_chunks(http: aiohttp.ClientSession) -> None:
    s = Setup(None, http)
    s.conv.on_user_text("Hi.")
    await until(lambda: bool(s.tts.streams) and len(s.tts.streams[0].requests) == 3)
    s.tts.streams[0].speak("turn-1", "Hi.", ["Hi."])
    await until(lambda: s.track.queued_samples > 0)
    frames = [await s.track.recv() for _ in range(6)]
    audio = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
    loud = np.flatnonzero(np.abs(audio) > 500)
    assert loud.size and loud[-1] - loud[0] == pytest.approx(2 * CHUNK, abs=64)  # 80 ms at 48 kHz
    assert len(frames) * FRAME_SAMPLES == audio.size
    await s.conv.close()


async def test_an_llm_failure_is_reported_and_the_call_goes_on(http: aiohttp.ClientSession) -> None:
    stub = LLMStub([TOKENS], status=500)
    s = Setup(await stub.start(), http)
    try:
        s.conv.on_user_text("Weather?")
        await until(lambda: bool(s.of(AgentDone)))
        (err,) = s.of(Error)
        assert err.service == "llm" and "500: scripted failure" in err.message
        assert s.of(AgentDone) == [AgentDone(1, True, "")]
        assert not s.conv.speaking
        stub.status = 200
        s.conv.on_user_text("Hello?")  # merged with the unanswered question
        await until(lambda: len(stub.requests) == 2)
        assert stub.requests[1]["messages"][1:] == [{"role": "user", "content": "Weather?\nHello?"}]
    finally:
        await s.conv.close()
        await stub.stop()


async def test_speech_interrupted_before_its_transcript_is_transcribed_with_the_next(
    http: aiohttp.ClientSession,
) -> None:
    """A pause longer than the stop hysteresis ends a turn; if the user goes on before the
    transcript is back, both parts go to the ASR together as one turn."""
    asr = ASRStub(["first part", "first part and the rest"], delay=0.3)
    s = Setup(None, http)
    s.conv.asr = ASRClient(ASRConfig(url=await asr.start()), http)
    try:
        part1, part2 = b"\x01\x00" * 8000, b"\x02\x00" * 4000  # 0.5 s and 0.25 s at 16 kHz
        s.conv.on_vad([SpeechStarted(at=1.0, began_at=0.8), SpeechEnded(2.0, 1.6, 0.5, audio=part1)])
        await until(lambda: len(asr.files) == 1)  # the first part is being transcribed
        s.conv.on_vad([SpeechStarted(at=2.2, began_at=2.0)])  # the user goes on
        assert s.of(AgentDone) == [AgentDone(1, True, "")]
        s.conv.on_vad([SpeechEnded(3.0, 2.6, 0.25, audio=part2)])
        await until(lambda: bool(s.of(Transcript)))
        assert wav_seconds(asr.files[1]) == pytest.approx(0.75)  # both parts, in order
        assert s.of(Transcript) == [Transcript(2, "first part and the rest", "voice")]
        assert s.conv.history[0] == {"role": "user", "content": "first part and the rest"}
    finally:
        await s.conv.close()
        await asr.stop()


async def test_leading_blank_lines_and_think_sections_never_reach_the_tts(
    http: aiohttp.ClientSession,
) -> None:
    stub = LLMStub([["<think>", "Short answer.", "</think>", "\n\n", " Hi", " there", "."]], interval=0.0)
    s = Setup(await stub.start(), http)
    try:
        s.conv.on_user_text("Hello?")
        await until(lambda: bool(s.tts.streams) and ("flush", "turn-1") in s.tts.streams[0].requests)
        assert s.tts.streams[0].texts() == "Hi there."
        assert [m.delta for m in s.of(AgentText)] == ["Hi", " there", "."]
    finally:
        await s.conv.close()
        await stub.stop()
