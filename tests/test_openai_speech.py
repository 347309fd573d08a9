"""The OpenAI-compatible ``POST /v1/audio/speech`` with the real ``openai`` package against
a live server (tiny CustomVoice checkpoint, greedy defaults): audio streams as it is
generated, every response format decodes, SSE, the bearer token, limits and errors in
OpenAI's shape."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import av
import grpc
import numpy as np
import pytest

from qwen3tts_rt.model.checkpoint import Checkpoint
from qwen3tts_rt.server.app import ServerThread
from qwen3tts_rt.server.config import ServerConfig
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc
from tests.plugin_helpers import EngineHold, short_custom_voice, utterances
from tests.server_helpers import start_server

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKEN = "test-token"
TEXT = "Hello there, this is a short test."
LONG = " ".join(["The quick brown fox jumps over the lazy dog."] * 8)
MAX_CHARS = 1000


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return short_custom_voice(tiny_checkpoint, tmp_path_factory.mktemp("ckpt"), max_frames=24)


@pytest.fixture(scope="module")
def server(ckpt: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    # bit-exact comparisons with the gRPC API's audio: fixed packets (adaptive: test_server_packets.py)
    srv = start_server(
        ckpt,
        tmp_path_factory.mktemp("voices"),
        openai_port=0,
        auth_token=TOKEN,
        max_synthesize_chars=MAX_CHARS,
        packet_policy="fixed",
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def speaker(ckpt: Checkpoint) -> str:
    return str(ckpt.config.speakers[0])


@pytest.fixture(scope="module")
def reference(server: ServerThread, speaker: str) -> bytes:
    """TEXT over the gRPC API."""
    return grpc_pcm(server, speaker, TEXT)


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Any:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.openai_port}/v1", api_key=TOKEN, max_retries=0)


def grpc_pcm(server: ServerThread, speaker: str, text: str) -> bytes:
    """The same request over the gRPC API (Synthesize, 24 kHz PCM_S16LE)."""
    with grpc.insecure_channel(server.address) as ch:
        req = pb.SynthesizeRequest(config=pb.StreamConfig(speaker=speaker), text=text)
        packets = pb_grpc.TextToSpeechStub(ch).Synthesize(
            req, metadata=(("authorization", f"Bearer {TOKEN}"),)
        )
        return b"".join(p.audio for p in packets)


def test_off_by_default_and_the_serve_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen3tts_rt import cli
    from qwen3tts_rt.server import app

    assert ServerConfig().openai_port is None
    seen: list[ServerConfig] = []

    async def fake_serve(config: ServerConfig) -> None:
        seen.append(config)

    monkeypatch.setattr(app, "serve", fake_serve)
    base = ["serve", "--model", "m", "--device", "cpu", "--dtype", "float32"]
    cli.cmd_serve(cli.build_parser().parse_args(base))
    cli.cmd_serve(cli.build_parser().parse_args([*base, "--openai-port", "8123", "--openai-host", "0.0.0.0"]))
    assert seen[0].openai_port is None
    assert (seen[1].openai_port, seen[1].openai_host) == (8123, "0.0.0.0")


def test_streamed_pcm_arrives_before_synthesis_ends(server: ServerThread, client: Any, speaker: str) -> None:
    """The device thread is held mid-utterance (at its 4th tick) until the client has read
    its first bytes: they can only arrive if the server streams as it generates."""
    engine = server.server.runtime.require_engine()
    done_before = utterances("openai")
    with (
        EngineHold(engine, tick=4) as hold,
        client.audio.speech.with_streaming_response.create(
            model="qwen3-tts", voice=speaker, input=LONG, response_format="pcm"
        ) as resp,
    ):
        assert resp.headers["content-type"] == "audio/pcm"
        chunks = resp.iter_bytes()
        first = next(chunks)
        assert first
        # the engine stops at its 4th tick until released: the utterance cannot end first
        assert hold.held.wait(60) and utterances("openai") == done_before
        hold.release()
        audio = first + b"".join(chunks)
    assert utterances("openai") == done_before + 1
    assert audio == grpc_pcm(server, speaker, LONG)  # the same audio as the gRPC API's


def _decode(data: bytes) -> tuple[int, int]:
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.audio[0]
        rate = stream.codec_context.sample_rate
        samples = sum(f.samples for f in c.decode(stream))
    return rate, samples


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav"])
def test_response_formats_decode(client: Any, speaker: str, reference: bytes, fmt: str) -> None:
    pcm = np.frombuffer(reference, "<i2")
    data = client.audio.speech.create(model="tts-1", voice=speaker, input=TEXT, response_format=fmt).content
    rate, samples = _decode(data)
    seconds = samples / rate
    # codec padding (encoder delay, frame rounding) adds at most a frame or two
    assert pcm.size / 24000 - 0.01 <= seconds <= pcm.size / 24000 + 0.15, (fmt, seconds, pcm.size / 24000)
    if fmt == "wav":
        assert data[:4] == b"RIFF" and rate == 24000
        np.testing.assert_array_equal(np.frombuffer(data[44:], "<i2"), pcm)


def _post(server: ServerThread, body: dict[str, Any], token: str | None = TOKEN) -> tuple[int, bytes, str]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{server.openai_port}/v1/audio/speech",
        data=json.dumps(body).encode(),
        headers={
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {token}"} if token else {}),
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def test_sse_stream(server: ServerThread, speaker: str, reference: bytes) -> None:
    status, body, ctype = _post(
        server,
        {"model": "x", "voice": speaker, "input": TEXT, "response_format": "pcm", "stream_format": "sse"},
    )
    assert status == 200 and ctype.startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert len(events) > 2 and events[-1]["type"] == "speech.audio.done"
    usage = events[-1]["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert audio == reference


def test_errors_in_openai_shape(server: ServerThread, client: Any, speaker: str) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"model": "m", "voice": speaker, "input": TEXT, "speed": 1.5}, "speed"),
        ({"model": "m", "voice": "nobody", "input": TEXT}, "voice"),
        ({"model": "m", "voice": speaker, "input": "  \n "}, "input"),
        ({"model": "m", "voice": speaker, "input": "x" * (MAX_CHARS + 1)}, "input"),
        ({"model": "m", "voice": speaker, "input": TEXT, "response_format": "ogg"}, "response_format"),
        ({"model": "m", "voice": speaker, "input": TEXT, "stream_format": "ws"}, "stream_format"),
        ({"voice": speaker, "input": TEXT}, "model"),
        ({"model": "m", "voice": speaker, "input": TEXT, "instructions": "y" * 5000}, "instructions"),
    ]
    for body, param in cases:
        status, raw, ctype = _post(server, body)
        assert status == 400, (body, raw)
        assert ctype.startswith("application/json")
        err = json.loads(raw)["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error", err
        assert err["message"].startswith(f"{param}:"), err
    # the SDK raises its own typed errors from them
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.speech.create(model="m", voice=speaker, input=TEXT, speed=2.0)
    assert "only 1.0" in str(e.value)
    status, raw, _ = _post(server, {"model": "m", "voice": speaker, "input": TEXT}, token="wrong")
    assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
    status, raw, _ = _post(server, {"model": "m", "voice": speaker, "input": TEXT}, token=None)
    assert status == 401
    bad = openai.OpenAI(base_url=f"http://127.0.0.1:{server.openai_port}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.audio.speech.create(model="m", voice=speaker, input=TEXT)
