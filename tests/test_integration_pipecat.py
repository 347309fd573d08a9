"""The Pipecat plugin in a real Pipecat pipeline against a live server (tiny CustomVoice
checkpoint, greedy): LLM text frames streamed in, audio frames out; an interruption
mid-reply cancels that utterance on the server, no audio follows it, and the assistant
context keeps only the words that were spoken."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from qwen3tts_rt.model.checkpoint import Checkpoint
from qwen3tts_rt.server.app import ServerThread
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc
from tests.plugin_helpers import EngineHold, short_custom_voice, until, utterances
from tests.server_helpers import BidiCall, collect, start_server

pytest.importorskip("pipecat")

from pipecat.frames.frames import (
    EndFrame,
    Frame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    MetricsFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData, TTSUsageMetricsData
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.task import PipelineParams, PipelineTask
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMAssistantAggregator
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from qwen3tts_rt.integrations.pipecat import Qwen3TTSService

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIRST = "Well the weather today is sunny and warm with a light"  # no sentence end
REST = " breeze from the west, so enjoy it outside. See you later."
REPLY = FIRST + REST
# Pipecat's context aggregation (token mode) gives words a place in the context sentence by
# sentence, so the interrupted reply starts with a short finished sentence
INTERRUPTED = "Sure thing. Well the weather today is sunny and warm with a light"


def tokens(text: str) -> list[str]:
    """LLM-like deltas: a word's leading space with it, long words cut in three-letter pieces."""
    out: list[str] = []
    for m in re.finditer(r"\s*\S+", text):
        w = m.group()
        out += [w[i : i + 4] for i in range(0, len(w), 4)]
    assert "".join(out) == text
    return out


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return short_custom_voice(tiny_checkpoint, tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def server(ckpt: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    # bit-exact comparisons with one-frame decodes: fixed packets (adaptive: test_server_packets.py)
    srv = start_server(ckpt, tmp_path_factory.mktemp("voices"), packet_policy="fixed")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def speaker(ckpt: Checkpoint) -> str:
    return str(ckpt.config.speakers[0])


class Recorder(FrameProcessor):
    """Records every frame going downstream (what a transport would play)."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[Frame] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self.frames.append(frame)
        await self.push_frame(frame, direction)

    def of(self, cls: type) -> list[Any]:
        return [f for f in self.frames if isinstance(f, cls)]


class Bot:
    def __init__(self, server: ServerThread, speaker: str, rate: int) -> None:
        self.tts = Qwen3TTSService(
            address=server.address, settings=Qwen3TTSService.Settings(voice=speaker, language="en")
        )
        self.recorder = Recorder()
        self.context = LLMContext()
        self.task = PipelineTask(
            Pipeline([self.tts, self.recorder, LLMAssistantAggregator(self.context)]),
            params=PipelineParams(audio_out_sample_rate=rate, enable_metrics=True, enable_usage_metrics=True),
            idle_timeout_secs=None,
        )
        self.runner = asyncio.create_task(PipelineRunner(handle_sigint=False).run(self.task))

    async def say(self, *deltas: str) -> None:
        for d in deltas:
            await self.task.queue_frame(LLMTextFrame(d))
            await asyncio.sleep(0)  # one frame at a time, as an LLM streams them

    def assistant_text(self) -> str:
        msgs = [m for m in self.context.get_messages() if m.get("role") == "assistant"]
        return " ".join(str(m.get("content")) for m in msgs)

    async def stop(self) -> None:
        if self.runner.done():
            return
        await self.task.queue_frame(EndFrame())
        try:
            await asyncio.wait_for(asyncio.shield(self.runner), 60)
        finally:
            if not self.runner.done():  # a failed test: do not leave the pipeline running
                await self.task.cancel()
                await asyncio.wait_for(self.runner, 30)


def reference_pcm(server: ServerThread, speaker: str, deltas: list[str]) -> bytes:
    with grpc.insecure_channel(server.address) as ch:
        call = BidiCall(pb_grpc.TextToSpeechStub(ch))
        call.send(config=pb.StreamConfig(speaker=speaker, language="english")).text(*deltas).close()
        got = collect(call)
        return bytes(got.audio[0])


async def test_streamed_llm_text_in_audio_out(server: ServerThread, speaker: str) -> None:
    bot = Bot(server, speaker, 24000)
    try:
        first, rest = tokens(FIRST), tokens(REST)
        # the engine stops at its 3rd tick until the whole reply is in: the utterance cannot end
        # (at its frame cap) before the LLM has finished writing
        with EngineHold(server.server.runtime.require_engine(), tick=3) as hold:
            await bot.task.queue_frame(LLMFullResponseStartFrame())
            await bot.say(*first)
            # no sentence end yet: audio comes while the LLM is still writing
            await until(lambda: bool(bot.recorder.of(TTSAudioRawFrame)))
            await bot.say(*rest)
            await bot.task.queue_frame(LLMFullResponseEndFrame())
            hold.release()
        await until(lambda: bool(bot.recorder.of(TTSStoppedFrame)))
        await until(lambda: bool(bot.assistant_text()))
        await bot.stop()

        kinds = [type(f) for f in bot.recorder.frames if isinstance(f, (TTSStartedFrame, TTSStoppedFrame))]
        assert kinds == [TTSStartedFrame, TTSStoppedFrame]
        audio = b"".join(f.audio for f in bot.recorder.of(TTSAudioRawFrame))
        assert {f.sample_rate for f in bot.recorder.of(TTSAudioRawFrame)} == {24000}
        assert audio == reference_pcm(server, speaker, first + rest)  # same speech as the plain API's
        # every word reached the context, timed by the server's progress
        assert bot.assistant_text().split() == REPLY.split()
        assert [w for f in bot.recorder.of(TTSTextFrame) for w in f.text.split()] == REPLY.split()
        metrics = [d for f in bot.recorder.of(MetricsFrame) for d in f.data]
        ttfb = [d for d in metrics if isinstance(d, TTFBMetricsData) and "Qwen3TTS" in d.processor]
        usage = [d for d in metrics if isinstance(d, TTSUsageMetricsData) and "Qwen3TTS" in d.processor]
        assert any(d.value > 0 for d in ttfb)  # (the first report, at start, is a zero)
        assert usage and usage[0].value == len(REPLY)
        await until(lambda: server.server.runtime.require_engine().live_sessions == 0)
    finally:
        await bot.stop()


async def test_interruption_mid_reply(server: ServerThread, speaker: str) -> None:
    bot = Bot(server, speaker, 32000)  # a rate the server produces directly
    try:
        cancelled = utterances("tts", "cancelled")
        # the engine stops at its 12th tick until the interruption is on its way: the reply is
        # cut mid-utterance, whatever the speed of this machine
        with EngineHold(server.server.runtime.require_engine(), tick=12) as hold:
            await bot.task.queue_frame(LLMFullResponseStartFrame())
            await bot.say(*tokens(INTERRUPTED))
            # some of the reply has been spoken (audio and at least one word), none of it ended
            await until(
                lambda: len(bot.recorder.of(TTSAudioRawFrame)) >= 3 and bool(bot.recorder.of(TTSTextFrame))
            )
            key = bot.recorder.of(TTSAudioRawFrame)[0].context_id
            await bot.task.queue_frame(InterruptionFrame())
            await until(lambda: bool(bot.recorder.of(InterruptionFrame)))
            await asyncio.sleep(0.3)  # the Cancel crosses the loopback to the server's engine queue
            hold.release()
        cut = bot.recorder.frames.index(bot.recorder.of(InterruptionFrame)[0])
        # the server cancels that utterance (in-band: the stream goes on)
        await until(lambda: utterances("tts", "cancelled") == cancelled + 1)
        await until(lambda: key not in bot.tts._begun)  # its UtteranceDone(CANCELLED) came back
        await asyncio.sleep(0.2)  # let anything still in flight reach the recorder
        after = [
            f for f in bot.recorder.frames[cut:] if isinstance(f, TTSAudioRawFrame) and f.context_id == key
        ]
        assert after == []
        heard = [w for f in bot.recorder.frames[:cut] if isinstance(f, TTSTextFrame) for w in f.text.split()]
        await until(lambda: bool(bot.assistant_text()))
        spoken = bot.assistant_text().split()
        assert spoken == heard  # the context holds what was spoken ...
        assert 0 < len(spoken) < len(INTERRUPTED.split())  # ... a strict prefix of what the LLM wrote
        assert spoken == INTERRUPTED.split()[: len(spoken)]
        assert server.server.runtime.require_engine().live_sessions == 1  # the long-lived stream

        # the next turn speaks on the same stream
        n_audio = len(bot.recorder.of(TTSAudioRawFrame))
        await bot.task.queue_frame(LLMFullResponseStartFrame())
        await bot.say(*tokens("All right, next topic."))
        await bot.task.queue_frame(LLMFullResponseEndFrame())
        await until(lambda: len(bot.recorder.of(TTSStoppedFrame)) >= 1)
        assert len(bot.recorder.of(TTSAudioRawFrame)) > n_audio
        assert {f.sample_rate for f in bot.recorder.of(TTSAudioRawFrame)} == {32000}
        await bot.stop()
        await until(lambda: server.server.runtime.require_engine().live_sessions == 0)
    finally:
        await bot.stop()


async def test_settings_update_applies_from_the_next_utterance(
    server: ServerThread, speaker: str, ckpt: Checkpoint
) -> None:
    from pipecat.frames.frames import TTSSpeakFrame, TTSUpdateSettingsFrame

    other = str(ckpt.config.speakers[1])
    bot = Bot(server, speaker, 24000)
    try:
        await bot.task.queue_frame(TTSUpdateSettingsFrame(delta=Qwen3TTSService.Settings(voice=other)))
        await bot.task.queue_frame(TTSSpeakFrame("Hello there."))
        await until(lambda: bool(bot.recorder.of(TTSStoppedFrame)))
        audio = b"".join(f.audio for f in bot.recorder.of(TTSAudioRawFrame))
        assert audio == reference_pcm(server, other, ["Hello there."])  # the new speaker's voice
        assert server.server.runtime.require_engine().live_sessions == 1  # on the same stream
    finally:
        await bot.stop()
