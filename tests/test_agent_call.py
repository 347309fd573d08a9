"""A real call over WebRTC on 127.0.0.1: an aiortc peer speaks espeak-ng speech to the agent,
which runs webrtcvad turn-taking, an ASR stub, an LLM stub streaming over real HTTP, and the
real qwen3tts-rt gRPC server (tiny CustomVoice checkpoint, speaker vivian); the peer hears
the reply, barges in, and the agent's audio stops within one 20 ms frame."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import pytest

from agent.app import AgentServer
from agent.config import AgentConfig, ASRConfig, LLMConfig, TTSConfig, VadConfig
from agent.peer import PeerSession
from qwen3tts_rt.model.checkpoint import Checkpoint
from qwen3tts_rt.server.app import ServerThread
from tests.agent_helpers import (
    ESPEAK,
    ASRStub,
    ClientPeer,
    LLMStub,
    espeak,
    scrape_async,
    silence,
    wav_seconds,
    words,
)
from tests.server_helpers import sample, scrape, start_server

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(ESPEAK is None, reason="espeak-ng is not installed (apt-get install espeak-ng)"),
    pytest.mark.timeout(120),
]

REPLY = (
    "Sure! Today will be sunny and warm in most places, with a light breeze from the west, "
    "and the evening stays clear, so it is a good day for a long walk outside."
)
REPLY_TOKENS = words(REPLY)
SECOND = ["Okay", ",", " I", " will", " wait", "."]
ASKED = "what is the weather like today"
INTERRUPTION = "wait a moment please"


@pytest.fixture(scope="module")
def tts_server(
    tiny_loaded: Callable[..., Checkpoint], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    srv = start_server(tiny_loaded("custom_voice", 0), tmp_path_factory.mktemp("voices"))
    yield srv
    srv.stop()


@dataclass
class Call:
    agent: AgentServer
    peer: ClientPeer
    llm: LLMStub
    asr: ASRStub

    @property
    def session(self) -> PeerSession:
        (session,) = self.agent.peers.values()
        return session


@pytest.fixture
async def call(tts_server: ServerThread) -> AsyncIterator[Call]:
    llm = LLMStub([REPLY_TOKENS, SECOND], interval=0.02)
    asr = ASRStub([ASKED, INTERRUPTION])
    config = AgentConfig(
        tts=TTSConfig(address=tts_server.address, speaker="vivian", language="english"),
        llm=LLMConfig(url=await llm.start(), model="stub", system_prompt="Be brief."),
        asr=ASRConfig(url=await asr.start()),
        vad=VadConfig(aggressiveness=2, frame_ms=20, start_ms=160, stop_ms=400),
        http_port=0,
        metrics_port=0,
        ice_host_addresses=("127.0.0.1",),  # aioice leaves loopback out of its host candidates
    )
    agent = AgentServer(config)
    await agent.start()
    peer = ClientPeer()
    try:
        await peer.connect(agent.url)
        await peer.wait_for(lambda m: m["type"] == "ready", timeout=15)
        yield Call(agent, peer, llm, asr)
    finally:
        await peer.close()
        await agent.stop()
        await llm.stop()
        await asr.stop()


def of(peer: ClientPeer, kind: str, **match: object) -> Callable[[dict[str, object]], bool]:
    return lambda m: m["type"] == kind and all(m.get(k) == v for k, v in match.items())


async def test_spoken_turns_get_spoken_replies_and_barge_in_stops_the_audio(
    call: Call, tts_server: ServerThread
) -> None:
    peer = call.peer
    metrics_before = await scrape_async(call.agent.metrics_port or 0)  # a process-wide registry
    question = espeak("Hello there. What is the weather like today?")
    question_s = question.size / 48000
    peer.mic.play(question)
    spoke_at = time.monotonic()

    # --- turn 1: VAD turn events, ASR, LLM tokens into the TTS, audio back on the call
    start = await peer.wait_for(of(peer, "turn", event="start"), timeout=10)
    assert start["turn"] == 1
    assert time.monotonic() - spoke_at < 1.0
    end = await peer.wait_for(of(peer, "turn", event="end", turn=1), timeout=15)
    assert end["speech_ms"] > 0.5 * question_s * 1000
    speech_over = peer.mic.done_at
    assert speech_over is not None
    transcript = await peer.wait_for(of(peer, "transcript", turn=1))
    assert transcript == {"type": "transcript", "turn": 1, "text": ASKED, "input": "voice"}
    assert question_s - 0.3 < wav_seconds(call.asr.files[0]) < question_s + 1.5
    latency = await peer.wait_for(of(peer, "latency", turn=1), timeout=15)
    assert (
        latency["input"] == "voice" and latency["vad_stop_ms"] >= 400 - 25
    )  # 20 silent frames (timed on arrival)
    assert latency["llm_first_token_ms"] is not None and latency["token_to_audio_ms"] is not None
    assert latency["response_ms"] > latency["vad_stop_ms"]
    print(f"\nturn 1 latencies (ms): {latency}")
    assert call.llm.requests[0]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": ASKED},
    ]

    # the reply is heard on the far end
    heard_from = time.monotonic()
    while len(peer.loud_since(heard_from)) < 40:  # 0.8 s of the agent's voice
        await asyncio.sleep(0.02)
        assert time.monotonic() - heard_from < 10, "the agent's reply was not heard"
    assert [m["delta"] for m in peer.of_type("agent_text") if m["turn"] == 1] == REPLY_TOKENS

    # --- barge-in: the peer talks over the reply
    n = len(peer.messages)
    peer.mic.play(espeak("Wait a moment please."))
    barge = await peer.wait_for(of(peer, "barge_in", turn=1), timeout=10, after=n)
    done = await peer.wait_for(of(peer, "agent_done", turn=1), timeout=5, after=n)
    assert done["interrupted"]
    kept = done["text"]
    assert kept and REPLY.startswith(kept) and len(kept) < len(REPLY)  # only what was played
    print(f"barge-in: audio stopped {barge['stop_ms']:.1f} ms after the decision; kept {kept!r}")

    # within one frame: the frame sent before the decision carried audio, the next one is silent
    track = call.session.track
    assert track.last_stop is not None
    decided_at, stopped_at = track.last_stop
    assert barge["stop_ms"] == pytest.approx((stopped_at - decided_at) * 1000, abs=0.01)
    frames = list(track.frames)
    before = [f for f in frames if f.at <= decided_at]
    after = [f for f in frames if f.at > decided_at]
    assert before[-1].audible and after[0].at == stopped_at and not after[0].audible
    assert 0 <= barge["stop_ms"] <= 20 + 10  # one 20 ms frame (+ scheduling slack on a loaded box)
    assert not any(f.audible for f in after if f.at < decided_at + 0.3)  # and it stays silent
    # the far end stops hearing it once the frames in flight have arrived
    await asyncio.sleep(0.5)
    tail = peer.loud_since(time.monotonic() - 0.3)
    assert not tail, f"{len(tail)} loud frames heard 200-500 ms after the barge-in"
    last_heard = max(h.at for h in peer.heard if h.rms > 50 and h.at < decided_at + 0.3)
    print(f"far end: last loud frame arrived {(last_heard - decided_at) * 1000:.0f} ms after the decision")

    # the TTS server cancelled the utterance
    families = scrape(tts_server.metrics_port or 0)
    assert sample(families, "qwen3tts_utterances", "qwen3tts_utterances_total", reason="cancelled") >= 1

    # --- turn 2 (the interruption itself): the history holds what was played of turn 1
    await peer.wait_for(of(peer, "transcript", turn=2, text=INTERRUPTION), timeout=15)
    latency2 = await peer.wait_for(of(peer, "latency", turn=2), timeout=15)
    assert call.llm.requests[1]["messages"][1:] == [
        {"role": "user", "content": ASKED},
        {"role": "assistant", "content": kept},
        {"role": "user", "content": INTERRUPTION},
    ]
    print(f"turn 2 latencies (ms): {latency2}")

    # the agent's metrics endpoint counted both turns in the three latency histograms
    after = await scrape_async(call.agent.metrics_port or 0)

    def count(family: str, **labels: str) -> float:
        name = f"qwen3tts_agent_{family}_seconds"
        return sample(after, name, name + "_count", **labels) - sample(
            metrics_before, name, name + "_count", **labels
        )

    assert count("response_latency", input="voice") == 2
    assert count("first_token_to_audio", mode="llm") == 2
    assert count("barge_in_stop") == 1


async def test_typed_text_in_say_mode_is_spoken(tts_server: ServerThread) -> None:
    """No LLM, no ASR: the agent speaks the text it is given; the peer's mic stays silent."""
    config = AgentConfig(
        tts=TTSConfig(address=tts_server.address, speaker="vivian", language="english"),
        http_port=0,
        metrics_port=None,
        ice_host_addresses=("127.0.0.1",),
    )
    agent = AgentServer(config)
    await agent.start()
    peer = ClientPeer()
    try:
        await peer.connect(agent.url)
        ready = await peer.wait_for(of(peer, "ready"), timeout=15)
        assert ready["mode"] == "say" and ready["asr"] is False and ready["voice"] == "vivian"
        peer.mic.play(silence(0.2))
        sent_at = time.monotonic()
        peer.send({"type": "text", "text": "Good morning."})
        latency = await peer.wait_for(of(peer, "latency", turn=1), timeout=15)
        assert latency["input"] == "text" and latency["llm_first_token_ms"] is None
        print(f"\nsay mode: text -> first audio frame sent {latency['response_ms']:.0f} ms")
        while len(peer.loud_since(sent_at)) < 10:
            await asyncio.sleep(0.02)
            assert time.monotonic() - sent_at < 10, "the spoken text was not heard"
        peer.send({"type": "ping", "id": 7})
        await peer.wait_for(of(peer, "pong", id=7))
        peer.send({"type": "bogus"})
        err = await peer.wait_for(of(peer, "error"))
        assert "unknown message type" in str(err["message"])
        assert not peer.of_type("turn")  # silence is not a turn
    finally:
        await peer.close()
        await agent.stop()
