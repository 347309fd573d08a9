"""The LLM and ASR adapters against OpenAI-compatible stub servers over real HTTP (127.0.0.1),
and the data-channel message catalogue."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.asr import ASRClient, wav_bytes
from agent.config import ASRConfig, LLMConfig
from agent.errors import ASRError, BadRequestError, LLMError
from agent.llm import LLMClient, ThinkFilter, endpoint
from agent.messages import AgentDone, Interrupt, Ping, UserText, parse_inbound
from tests.agent_helpers import ASRStub, LLMStub, wav_seconds

TOKENS = ["Sure", ",", " the", " weather", " is", " sunny", "."]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def test_endpoint_takes_a_base_url_or_the_full_one() -> None:
    assert endpoint("http://h:8000/v1", "/chat/completions") == "http://h:8000/v1/chat/completions"
    assert endpoint("http://h:8000/v1/", "/chat/completions") == "http://h:8000/v1/chat/completions"
    full = "http://h:11434/v1/chat/completions"
    assert endpoint(full, "/chat/completions") == full


async def test_llm_streams_tokens_as_they_arrive(http: aiohttp.ClientSession) -> None:
    stub = LLMStub([TOKENS], interval=0.05)
    url = await stub.start()
    try:
        llm = LLMClient(
            LLMConfig(url=url, model="qwen3-8b", api_key="k", temperature=0.3, max_tokens=50), http
        )
        got: list[tuple[str, float]] = []
        loop = asyncio.get_running_loop()
        async for tok in llm.stream(MESSAGES):
            got.append((tok, loop.time()))
        assert [t for t, _ in got] == TOKENS
        # streamed, not buffered: the tokens arrive spread over the stub's pacing
        assert got[-1][1] - got[0][1] > 0.6 * 0.05 * (len(TOKENS) - 1)
        body = stub.requests[0]
        assert body == {
            "model": "qwen3-8b",
            "messages": MESSAGES,
            "stream": True,
            "temperature": 0.3,
            "max_tokens": 50,
        }
        assert stub.headers[0]["Authorization"] == "Bearer k"
    finally:
        await stub.stop()


async def test_llm_request_is_closed_when_the_consumer_is_cancelled(http: aiohttp.ClientSession) -> None:
    stub = LLMStub([["tok"] * 200], interval=0.02)
    url = await stub.start()
    try:
        llm = LLMClient(LLMConfig(url=url), http)
        got: list[str] = []

        async def consume() -> None:
            async for tok in llm.stream(MESSAGES):
                got.append(tok)

        task = asyncio.create_task(consume())
        while len(got) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):  # the stub notices the hang-up on its next write
            if stub.aborted:
                break
            await asyncio.sleep(0.01)
        assert stub.aborted == 1 and stub.tokens_sent[0] < 20
    finally:
        await stub.stop()


async def test_llm_errors_say_what_happened(http: aiohttp.ClientSession) -> None:
    stub = LLMStub([TOKENS], status=404)
    url = await stub.start()
    try:
        with pytest.raises(LLMError, match="404: scripted failure"):
            async for _ in LLMClient(LLMConfig(url=url), http).stream(MESSAGES):
                pass
    finally:
        await stub.stop()
    with pytest.raises(LLMError, match=r"Client\w*Error"):  # nobody listening there any more
        async for _ in LLMClient(LLMConfig(url=url), http).stream(MESSAGES):
            pass


async def test_llm_parses_keepalives_and_rejects_garbage(http: aiohttp.ClientSession) -> None:
    bodies = {
        "/ok/chat/completions": b": keep-alive\n\nevent: message\ndata: "
        + json.dumps({"choices": [{"delta": {"content": "a"}}]}).encode()
        + b"\r\n\r\ndata: "
        + json.dumps({"choices": [{"delta": {}}]}).encode()
        + b"\n\ndata: "
        + json.dumps({"choices": [{"delta": {"content": "b"}}]}).encode()
        + b"\n\ndata: [DONE]\n\ndata: "
        + json.dumps({"choices": [{"delta": {"content": "after done"}}]}).encode()
        + b"\n\n",
        "/bad/chat/completions": b"data: {not json\n\n",
    }

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=bodies[request.path], content_type="text/event-stream")

    app = web.Application()
    app.router.add_post("/{name}/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        got = [t async for t in LLMClient(LLMConfig(url=f"{base}/ok"), http).stream(MESSAGES)]
        assert got == ["a", "b"]
        with pytest.raises(LLMError, match="bad server-sent event"):
            async for _ in LLMClient(LLMConfig(url=f"{base}/bad"), http).stream(MESSAGES):
                pass
    finally:
        await runner.cleanup()


async def test_asr_uploads_a_wav_and_returns_the_text(http: aiohttp.ClientSession) -> None:
    stub = ASRStub(["  what is the weather like today  "])
    url = await stub.start()
    try:
        pcm = b"\x01\x00" * 16000  # 1 s at 16 kHz
        asr = ASRClient(ASRConfig(url=url, model="whisper-large-v3", language="en"), http)
        assert await asr.transcribe(pcm) == "what is the weather like today"
        assert wav_seconds(stub.files[0]) == pytest.approx(1.0)
        assert stub.files[0] == wav_bytes(pcm)
        assert stub.forms[0] == {"model": "whisper-large-v3", "response_format": "json", "language": "en"}
    finally:
        await stub.stop()
    with pytest.raises(ASRError, match=r"Client\w*Error"):
        await ASRClient(ASRConfig(url=url), http).transcribe(pcm)


def test_inbound_messages_are_checked() -> None:
    kw = {"max_bytes": 1000, "max_text_chars": 20}
    assert parse_inbound('{"type": "text", "text": "  hi  "}', **kw) == UserText("hi")
    assert parse_inbound(b'{"type": "interrupt"}', **kw) == Interrupt()
    assert parse_inbound('{"type": "ping", "id": 3}', **kw) == Ping(3)
    for raw, why in [
        ("nope", "not JSON"),
        ("[1]", "JSON object"),
        ('{"type": "text"}', "string 'text'"),
        ('{"type": "text", "text": "   "}', "empty"),
        ('{"type": "text", "text": "' + "x" * 21 + '"}', "at most 20"),
        ('{"type": "dance"}', "unknown message type 'dance'"),
        ("x" * 1001, "1001 bytes"),
    ]:
        with pytest.raises(BadRequestError, match=why):
            parse_inbound(raw, **kw)


def test_outbound_messages_are_json_with_a_type() -> None:
    msg = json.loads(AgentDone(turn=3, interrupted=True, text="Sure, the").to_json())
    assert msg == {"type": "agent_done", "turn": 3, "interrupted": True, "text": "Sure, the"}


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(
        st.sampled_from(["<think>", "</think>", "<", "think", ">", "</", "a", " b", "\n", "<t"]), max_size=12
    ),
    data=st.data(),
)
def test_think_sections_are_dropped_however_the_text_is_split(parts: list[str], data: st.DataObject) -> None:
    text = "".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=6)))
    deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    f = ThinkFilter()
    got = "".join(f.push(d) for d in deltas) + f.flush()
    # reference: the same scan over the whole text at once
    want, inside, i = [], False, 0
    while True:
        tag = "</think>" if inside else "<think>"
        j = text.find(tag, i)
        if j < 0:
            if not inside:
                want.append(text[i:])
            break
        if not inside:
            want.append(text[i:j])
        i, inside = j + len(tag), not inside
    assert got == "".join(want)


async def test_llm_drops_think_sections(http: aiohttp.ClientSession) -> None:
    stub = LLMStub(
        [["<th", "ink>", "The user", " greets me.", "</thi", "nk>", "\n\n", "Hello", "!"]], interval=0
    )
    url = await stub.start()
    try:
        got = [t async for t in LLMClient(LLMConfig(url=url), http).stream(MESSAGES)]
        assert "".join(got) == "\n\nHello!"  # the conversation drops the leading blank lines
        kept = [t async for t in LLMClient(LLMConfig(url=url, strip_think=False), http).stream(MESSAGES)]
        assert "".join(kept).startswith("<think>The user greets me.</think>")
    finally:
        await stub.stop()
