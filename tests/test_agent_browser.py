"""The page in a real browser: headless Chromium (Debian's ``chromium``, driven by Python
playwright through ``executable_path``; no browser is downloaded) with a fake microphone
playing an espeak-ng WAV loads the agent's page and connects over WebRTC on 127.0.0.1; the
spoken sentence is a VAD turn that gets a spoken reply; typed text sent over the data channel
interrupts that reply and gets its own; the agent's audio is checked through getStats and the
page's audio analyser. Behind the agent: the real
qwen3tts-rt server (tiny CustomVoice checkpoint) and an LLM stub streaming over real HTTP.
The screenshot goes to $AGENT_SCREENSHOT (docs/agent.png in the README was made with
AGENT_SCREENSHOT=docs/agent.png), else to a temporary file, so `make test` leaves the tree clean."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.app import AgentServer
from agent.config import AgentConfig, ASRConfig, LLMConfig, TTSConfig, VadConfig
from qwen3tts_rt.model.checkpoint import Checkpoint
from qwen3tts_rt.server.app import ServerThread
from tests.agent_helpers import CHROMIUM, ESPEAK, ASRStub, LLMStub, espeak, silence, words, write_wav
from tests.server_helpers import start_server

try:
    from playwright.async_api import async_playwright
except ImportError:  # pragma: no cover - `make test` installs it
    async_playwright = None  # type: ignore[assignment]

REPO = Path(__file__).resolve().parent.parent
SCREENSHOT = Path(os.environ.get("AGENT_SCREENSHOT") or tempfile.gettempdir() + "/qwen3tts-agent.png")

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(
        async_playwright is None, reason="playwright is not installed (pip install playwright)"
    ),
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="Debian's chromium is not installed (apt-get install chromium; `make test` does it)",
    ),
    pytest.mark.skipif(ESPEAK is None, reason="espeak-ng is not installed (apt-get install espeak-ng)"),
    pytest.mark.timeout(120),
]

ASKED = "hello agent can you hear me"
VOICE_REPLY = words(
    "Yes, I can hear you well, and I will keep talking for a while so that you can interrupt me."
)
TEXT_REPLY = ["Hi", "!", " I", " am", " speaking", " through", " the", " qwen3tts", "-rt", " server", "."]


def chromium_args(fake_mic: Path) -> list[str]:
    return [
        # offline and quiet: nothing leaves the machine
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-domain-reliability",
        "--metrics-recording-only",
        # WebRTC between two processes of this machine, over loopback
        "--allow-loopback-in-peer-connection",
        "--disable-features=WebRtcHideLocalIpsWithMdns",
        # a microphone that plays a WAV file once, granted without a prompt
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={fake_mic}%noloop",
        "--autoplay-policy=no-user-gesture-required",
    ]


@pytest.fixture(scope="module")
def tts_server(
    tiny_loaded: Callable[..., Checkpoint], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    srv = start_server(tiny_loaded("custom_voice", 0), tmp_path_factory.mktemp("voices"))
    yield srv
    srv.stop()


async def wait_for_audio(page: Any, timeout_ms: int = 20_000) -> dict[str, float]:
    """Until the page's analyser sees the agent's voice and getStats counts its energy."""
    await page.wait_for_function(
        """async () => {
            const s = await window.agent.audioStats();
            return s.peakLevel > 0.01 && s.totalAudioEnergy > 0;
        }""",
        timeout=timeout_ms,
        polling=100,
    )
    stats: dict[str, float] = await page.evaluate("window.agent.audioStats()")
    return stats


async def wait_message(page: Any, kind: str, timeout_ms: int = 20_000, **match: object) -> dict[str, Any]:
    """The first data-channel message of this type (and these fields) the page received."""
    cond = " && ".join(
        [f"m.type === {json.dumps(kind)}"] + [f"m.{k} === {json.dumps(v)}" for k, v in match.items()]
    )
    try:
        await page.wait_for_function(f"window.agent.messages.some(m => {cond})", timeout=timeout_ms)
    except Exception:
        got = await page.evaluate("window.agent.messages")
        raise AssertionError(f"no {kind} {match} message; the page got: {got}") from None
    found: dict[str, Any] = await page.evaluate(f"window.agent.messages.find(m => {cond})")
    return found


async def test_page_talks_listens_and_is_interrupted(tts_server: ServerThread, tmp_path: Path) -> None:
    assert async_playwright is not None and CHROMIUM is not None
    speech = espeak("Hello agent, can you hear me?")
    fake_mic = write_wav(tmp_path / "mic.wav", np.concatenate([silence(1.5), speech, silence(1.0)]))
    llm = LLMStub([VOICE_REPLY, TEXT_REPLY], interval=0.03)
    asr = ASRStub([ASKED])
    config = AgentConfig(
        tts=TTSConfig(address=tts_server.address, speaker="vivian", language="english"),
        llm=LLMConfig(url=await llm.start(), model="stub"),
        asr=ASRConfig(url=await asr.start()),
        vad=VadConfig(start_ms=160, stop_ms=400),
        http_port=0,
        metrics_port=None,
        ice_host_addresses=("127.0.0.1",),
    )
    agent = AgentServer(config)
    await agent.start()
    try:
        async with async_playwright() as p:
            context = await p.chromium.launch_persistent_context(
                str(tmp_path / "profile"),  # a fresh --user-data-dir
                executable_path=CHROMIUM,
                headless=True,
                args=chromium_args(fake_mic),
                viewport={"width": 1000, "height": 720},
            )
            try:
                page = context.pages[0] if context.pages else await context.new_page()
                console: list[str] = []
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
                await page.goto(agent.url)
                assert await page.title() == "qwen3tts-agent"
                await page.click("#connect")
                await page.wait_for_function("window.agent.dataChannelState === 'open'", timeout=20_000)
                await page.wait_for_function("window.agent.connectionState === 'connected'", timeout=20_000)
                await page.wait_for_selector("#mode:has-text('LLM')")

                # turn 1: the fake microphone's sentence -> VAD turn -> ASR -> LLM -> TTS -> the page hears it
                await wait_message(page, "turn", event="end", turn=1, timeout_ms=20_000)
                vad_states = await page.evaluate(
                    "window.agent.messages.filter(m => m.type === 'vad').map(m => m.state)"
                )
                assert "speaking" in vad_states and vad_states[-1] == "quiet"
                await wait_message(page, "latency", turn=1, timeout_ms=20_000)
                first = await wait_for_audio(page)
                assert await page.inner_text("#transcript li.user .text") == ASKED
                await page.uncheck("#mic")

                # turn 2: typed text over the data channel interrupts the reply and gets its own
                await page.evaluate("window.agent.resetPeak()")
                await page.fill("#text", "Hello from the browser")
                await page.click("#send")
                sent_at = time.monotonic()
                await wait_message(page, "barge_in", turn=1, timeout_ms=10_000)
                await wait_message(page, "agent_done", turn=1, interrupted=True, timeout_ms=10_000)
                await wait_message(page, "latency", turn=2, timeout_ms=20_000)
                second = await wait_for_audio(page)
                heard_s = time.monotonic() - sent_at
                assert second["packetsReceived"] > first["packetsReceived"]
                assert second["totalSamplesReceived"] > first["totalSamplesReceived"]
                assert second["totalAudioEnergy"] > first["totalAudioEnergy"]
                await page.wait_for_selector(f"#transcript li.agent:has-text('{''.join(TEXT_REPLY)}')")
                assert await page.locator("#transcript li.agent.interrupted").count() == 1
                assert llm.requests[1]["messages"][-1] == {
                    "role": "user",
                    "content": "Hello from the browser",
                }
                lat = {
                    m["turn"]: m
                    for m in await page.evaluate("window.agent.messages.filter(m => m.type === 'latency')")
                }
                barge = await page.evaluate("window.agent.messages.find(m => m.type === 'barge_in')")
                print(
                    f"\nbrowser: voice turn: end of speech -> first audio frame {lat[1]['response_ms']:.0f} ms "
                    f"(VAD stop {lat[1]['vad_stop_ms']:.0f}, ASR {lat[1]['asr_ms']:.0f}, "
                    f"LLM first token {lat[1]['llm_first_token_ms']:.0f}, token -> audio {lat[1]['token_to_audio_ms']:.0f}); "
                    f"barge-in stop {barge['stop_ms']:.1f} ms; text turn: {lat[2]['response_ms']:.0f} ms "
                    f"(token -> audio {lat[2]['token_to_audio_ms']:.0f}); page analyser heard it "
                    f"{heard_s * 1000:.0f} ms after the click"
                )
                await page.wait_for_timeout(400)  # let the level meter and the table settle
                # the table: "heard" adds this browser's receive delay (getStats) to "response"
                rows = await page.evaluate(
                    "[...document.querySelectorAll('#latency tbody tr')]"
                    ".map(tr => [...tr.cells].map(td => td.textContent))"
                )
                assert [r[0] for r in rows] == ["1", "2"], rows
                receive_ms = await page.evaluate("window.agent.receiveDelayMs")
                assert receive_ms is not None and receive_ms > 0
                for r in rows:
                    assert int(r[3]) >= int(r[2]), rows  # heard >= response
                print(f"browser: receive delay (jitter buffer + playout) {receive_ms:.0f} ms; table {rows}")
                SCREENSHOT.parent.mkdir(exist_ok=True)
                await page.screenshot(path=str(SCREENSHOT), full_page=True)
                # hang up while the agent speaks: the level meter goes back to zero
                await page.fill("#text", "One more thing")
                await page.click("#send")
                await page.wait_for_function("document.getElementById('level').value > 0.01", timeout=20_000)
                await page.click("#disconnect")
                assert await page.inner_text("#conn") == "idle"
                assert await page.evaluate("document.getElementById('level').value") == 0
                assert not [c for c in console if c.startswith("error")], console
            finally:
                await context.close()
        assert SCREENSHOT.stat().st_size < 300_000
        for _ in range(100):  # the agent notices the hang-up
            if not agent.peers:
                break
            await asyncio.sleep(0.05)
        assert not agent.peers
    finally:
        await agent.stop()
        await llm.stop()
        await asr.stop()
