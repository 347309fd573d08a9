"""The agent's HTTP side and command line: the page and its files, /config, /healthz,
/metrics, POST /offer's checks (bad JSON, wrong type, bad SDP, size limit, too many calls),
an unreachable TTS server reported on the data channel, and ``qwen3tts-agent`` /
``python -m agent`` in a real process (settings parsed, SIGTERM)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from agent.__main__ import build_parser, config_from_args
from agent.app import AgentServer
from agent.config import AgentConfig, ConfigError, IceServer, TTSConfig
from tests.agent_helpers import ClientPeer, scrape_async

REPO = Path(__file__).resolve().parent.parent
NOWHERE = "127.0.0.1:1"  # no TTS server listens there


@pytest.fixture
async def agent() -> AsyncIterator[AgentServer]:
    config = AgentConfig(
        tts=TTSConfig(address=NOWHERE, speaker="vivian"),
        http_port=0,
        metrics_port=0,
        ice_servers=(IceServer(("stun:stun.example.org:3478",)),),  # handed to the page, never used here
        ice_host_addresses=("127.0.0.1",),
        max_peers=1,
        max_offer_bytes=8192,
    )
    server = AgentServer(config.validated())
    await server.start()
    yield server
    await server.stop()
    await server.stop()  # twice is fine


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_page_config_and_health(agent: AgentServer, http: aiohttp.ClientSession) -> None:
    async with http.get(agent.url + "/") as r:
        assert r.status == 200 and "<title>qwen3tts-agent</title>" in await r.text()
    for name in ("app.js", "style.css"):
        async with http.get(f"{agent.url}/static/{name}") as r:
            assert r.status == 200
    async with http.get(agent.url + "/static/../app.py") as r:
        assert r.status in (403, 404)
    async with http.get(agent.url + "/config") as r:
        assert await r.json() == {
            "iceServers": [{"urls": ["stun:stun.example.org:3478"]}],
            "mode": "say",
            "asr": False,
            "voice": "vivian",
            "maxTextChars": 2000,
        }
    async with http.get(agent.url + "/healthz") as r:
        assert await r.text() == "ok"
    families = await scrape_async(agent.metrics_port or 0)
    for name in (
        "qwen3tts_agent_response_latency_seconds",
        "qwen3tts_agent_first_token_to_audio_seconds",
        "qwen3tts_agent_barge_in_stop_seconds",
        "qwen3tts_agent_peers",
    ):
        assert name in families


async def test_offer_is_checked(agent: AgentServer, http: aiohttp.ClientSession) -> None:
    async def offer(**kw: object) -> tuple[int, dict[str, object]]:
        async with http.post(agent.url + "/offer", **kw) as r:  # type: ignore[arg-type]
            return r.status, await r.json(content_type=None)

    status, body = await offer(data=b"{nope")
    assert status == 400 and "not JSON" in str(body["error"])
    status, body = await offer(json={"sdp": "v=0\r\n", "type": "answer"})
    assert status == 400 and "type must be 'offer'" in str(body["error"])
    status, body = await offer(json={"type": "offer"})
    assert status == 400 and "SDP string" in str(body["error"])
    status, body = await offer(json={"sdp": "v=0\r\nthis is not SDP\r\n", "type": "offer"})
    assert status == 400 and "offer rejected" in str(body["error"])
    assert not agent.peers  # the rejected peer was cleaned up
    async with http.post(agent.url + "/offer", json={"sdp": "v=0" + "x" * 9000, "type": "offer"}) as r:
        assert r.status == 413  # max_offer_bytes
    # one call is allowed here; a second offer meanwhile gets 503
    first, second = ClientPeer(), ClientPeer()
    try:
        await first.connect(agent.url)
        await first.wait_for(lambda m: m["type"] == "ready", timeout=15)
        assert len(agent.peers) == 1
        await second.pc.setLocalDescription(await second.pc.createOffer())
        status, body = await offer(json={"sdp": second.pc.localDescription.sdp, "type": "offer"})
        assert status == 503 and "at most 1" in str(body["error"])
    finally:
        await first.close()
        await second.close()
    for _ in range(100):  # the agent notices the hang-up
        if not agent.peers:
            break
        await asyncio.sleep(0.02)
    assert not agent.peers


async def test_unreachable_tts_is_reported_on_the_call(agent: AgentServer) -> None:
    peer = ClientPeer()
    try:
        await peer.connect(agent.url)
        await peer.wait_for(lambda m: m["type"] == "ready", timeout=15)
        peer.send({"type": "text", "text": "Anyone there?"})
        err = await peer.wait_for(lambda m: m["type"] == "error", timeout=15)
        assert err["service"] == "tts" and "UNAVAILABLE" in str(err["message"])
        done = await peer.wait_for(lambda m: m["type"] == "agent_done", timeout=5)
        assert done == {"type": "agent_done", "turn": 1, "interrupted": True, "text": ""}
    finally:
        await peer.close()


def test_command_line_builds_the_config() -> None:
    a = build_parser().parse_args(
        [
            "--tts", "tts:50051", "--speaker", "vivian", "--language", "english",
            "--llm-url", "http://127.0.0.1:8000/v1", "--llm-model", "qwen3", "--temperature", "0.7",
            "--asr-url", "http://127.0.0.1:8001/v1", "--asr-language", "en",
            "--vad-aggressiveness", "3", "--vad-frame-ms", "30", "--vad-start-ms", "150", "--vad-stop-ms", "700",
            "--ice-server", "stun:stun.l.google.com:19302", "--ice-server", "turn:turn.example.org:3478",
            "--ice-username", "u", "--ice-credential", "p", "--ice-host", "127.0.0.1",
            "--port", "0", "--metrics-port", "-1",
        ]
    )  # fmt: skip
    c = config_from_args(a)
    assert (c.tts.address, c.tts.speaker, c.tts.language) == ("tts:50051", "vivian", "english")
    assert (c.llm.url, c.llm.model, c.llm.temperature) == ("http://127.0.0.1:8000/v1", "qwen3", 0.7)
    assert (c.asr.url, c.asr.language) == ("http://127.0.0.1:8001/v1", "en")
    assert (c.vad.aggressiveness, c.vad.frame_ms, c.vad.start_ms, c.vad.stop_ms) == (3, 30, 150, 700)
    assert c.ice_servers == (
        IceServer(("stun:stun.l.google.com:19302",)),
        IceServer(("turn:turn.example.org:3478",), "u", "p"),
    )
    assert c.ice_host_addresses == ("127.0.0.1",) and c.metrics_port is None and not c.say_mode
    # defaults: no ICE servers, say mode, no ASR
    d = config_from_args(build_parser().parse_args([]))
    assert d.ice_servers == () and d.say_mode and d.asr.url is None
    with pytest.raises(ConfigError, match="not both"):
        config_from_args(build_parser().parse_args(["--voice", "v1", "--speaker", "vivian"]))
    with pytest.raises(ConfigError, match="stun:"):
        config_from_args(build_parser().parse_args(["--ice-server", "http://x"]))


def test_the_command_serves_until_sigterm() -> None:
    script = Path(sys.executable).parent / "qwen3tts-agent"  # the console script (pip install -e .)
    command = [str(script)] if script.exists() else [sys.executable, "-m", "agent"]
    proc = subprocess.Popen(
        [*command, "--port", "0", "--metrics-port", "-1", "--tts", NOWHERE, "--speaker", "vivian"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("qwen3tts-agent on http://127.0.0.1:"), first
        url = first.split()[-1]
        tts_line = proc.stdout.readline()
        assert tts_line.startswith(f"TTS {NOWHERE}: not answering yet"), tts_line
        assert proc.stdout.readline().strip() == "say mode (no LLM); no ASR"
        with urllib.request.urlopen(url + "/healthz", timeout=10) as r:
            assert r.read() == b"ok"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    bad = subprocess.run(
        [sys.executable, "-m", "agent", "--vad-frame-ms", "25"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "10, 20 or 30" in bad.stderr
