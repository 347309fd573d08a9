"""The LiveKit Agents plugin against a live server (tiny CustomVoice checkpoint, greedy):
``synthesize()``, ``stream()`` with one ``push_text`` per token, ``aclose()`` mid-reply
cancelling on the server, connection reuse, any sample rate."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from qwen3tts_rt.model.checkpoint import Checkpoint
from qwen3tts_rt.server.app import ServerThread
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc
from tests.plugin_helpers import EngineHold, short_custom_voice, until, utterances
from tests.server_helpers import BidiCall, collect, start_server

pytest.importorskip("livekit.agents")

from livekit.agents import tts as lk_tts

from qwen3tts_rt.integrations import livekit as qwen3tts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = "Hello from the agent, how are you today?"
TOKENS = ["Hello", " from", " the", " ag", "ent,", " how", " are", " you", " to", "day?"]
LONG = ["Well", " the", " weather", " today", " is", " sunny", " and", " warm", " with", " a", " light"]


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


def reference_pcm(server: ServerThread, speaker: str, text: str, rate: int = 24000) -> np.ndarray:
    with grpc.insecure_channel(server.address) as ch:
        call = BidiCall(pb_grpc.TextToSpeechStub(ch))
        cfg = pb.StreamConfig(speaker=speaker, language="english", sample_rate_hz=rate)
        call.send(config=cfg).text(text).close()
        return collect(call).pcm(0)


def live(server: ServerThread) -> int:
    return server.server.runtime.require_engine().live_sessions


def pcm_of(events: list[lk_tts.SynthesizedAudio]) -> np.ndarray:
    return np.concatenate([np.frombuffer(e.frame.data, dtype=np.int16) for e in events])


async def test_synthesize_and_connection_reuse(server: ServerThread, speaker: str) -> None:
    tts = qwen3tts.TTS(address=server.address, voice=speaker, language="en")
    async with tts.synthesize(TEXT) as stream:
        events = [ev async for ev in stream]
    assert {e.frame.sample_rate for e in events} == {24000}
    np.testing.assert_array_equal(pcm_of(events), reference_pcm(server, speaker, TEXT))
    assert live(server) == 1  # the pooled stream stays open ...
    async with tts.synthesize(TEXT) as stream:
        again = [ev async for ev in stream]
    np.testing.assert_array_equal(pcm_of(again), pcm_of(events))
    assert live(server) == 1  # ... and the second call reused it
    assert tts._pool.last_connection_reused
    await tts.aclose()
    await until(lambda: live(server) == 0)


async def test_stream_one_push_per_token(server: ServerThread, speaker: str) -> None:
    tts = qwen3tts.TTS(address=server.address, voice=speaker, language="en", sample_rate=32000)
    stream = tts.stream()
    events: list[lk_tts.SynthesizedAudio] = []

    async def read() -> None:
        async for ev in stream:
            events.append(ev)

    reader = asyncio.create_task(read())
    with EngineHold(server.server.runtime.require_engine(), tick=6) as hold:
        for tok in TOKENS[:5]:
            stream.push_text(tok)
            await asyncio.sleep(0)
        await until(lambda: bool(events))  # audio before the text has ended
        for tok in TOKENS[5:]:
            stream.push_text(tok)
        stream.end_input()
        hold.release()
    await asyncio.wait_for(reader, 60)
    await stream.aclose()
    assert {e.frame.sample_rate for e in events} == {32000}
    assert events[-1].is_final
    np.testing.assert_array_equal(pcm_of(events), reference_pcm(server, speaker, "".join(TOKENS), 32000))
    await tts.aclose()


async def test_aclose_mid_reply_cancels_on_the_server(server: ServerThread, speaker: str) -> None:
    tts = qwen3tts.TTS(address=server.address, voice=speaker, language="en")
    cancelled = utterances("tts", "cancelled")
    stream = tts.stream()
    events: list[lk_tts.SynthesizedAudio] = []

    async def read() -> None:
        async for ev in stream:
            events.append(ev)

    reader = asyncio.create_task(read())
    with EngineHold(server.server.runtime.require_engine(), tick=8) as hold:
        for tok in LONG:  # the reply goes on: no end_input
            stream.push_text(tok)
        await until(lambda: bool(events))
        await stream.aclose()
        await asyncio.sleep(0.3)  # the Cancel crosses the loopback to the server's engine queue
        hold.release()
    await until(lambda: utterances("tts", "cancelled") == cancelled + 1)  # the server stopped speaking it
    reader.cancel()
    # the pooled stream confirmed the cancel and is reused by the next synthesis
    async with tts.synthesize(TEXT) as s2:
        after = [ev async for ev in s2]
    np.testing.assert_array_equal(pcm_of(after), reference_pcm(server, speaker, TEXT))
    assert tts._pool.last_connection_reused and live(server) == 1
    await tts.aclose()
    await until(lambda: live(server) == 0)


async def test_any_sample_rate_and_update_options(
    server: ServerThread, speaker: str, ckpt: Checkpoint
) -> None:
    tts = qwen3tts.TTS(address=server.address, voice=speaker, language="en", sample_rate=20000)
    async with tts.synthesize(TEXT) as stream:
        events = [ev async for ev in stream]
    assert {e.frame.sample_rate for e in events} == {20000}  # resampled here from 24 kHz
    ref = reference_pcm(server, speaker, TEXT)
    assert abs(pcm_of(events).size - ref.size * 20000 / 24000) < 200
    other = str(ckpt.config.speakers[1])
    tts.update_options(voice=other)
    async with tts.synthesize(TEXT) as stream:
        changed = [ev async for ev in stream]
    assert pcm_of(changed).size > 0
    assert not np.array_equal(pcm_of(changed), pcm_of(events))  # the other speaker's voice
    await tts.aclose()
