"""Auth comes first (issue 14): credentials are checked from the metadata before a request
body is read or parsed, the bearer scheme is case-insensitive (RFC 7235), and the /metrics
endpoint answers on its own path only, behind its own optional token."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qwen3tts_rt.model.checkpoint import Checkpoint
from qwen3tts_rt.server.app import ServerThread
from qwen3tts_rt.server.interceptors import (
    BearerAuthInterceptor,
    UndecodableRequestInterceptor,
    bearer_matches,
)
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc
from tests.reliability import record
from tests.server_helpers import rpc_error, scrape, start_server

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKEN = "order-token"
GOOD = [("authorization", f"Bearer {TOKEN}")]
GARBAGE = b"\xff\xff\xff\xff\x0f"  # a field key with no end: no protobuf message parses from it
TTS = "/qwen3tts_rt.v1.TextToSpeech/"
RIVA = "/nvidia.riva.tts.RivaSpeechSynthesis/"


def _raw(b: bytes) -> bytes:
    return b


@pytest.fixture(scope="module")
def server(
    tiny_loaded: Callable[..., Checkpoint], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    srv = start_server(
        tiny_loaded("base", 0),
        tmp_path_factory.mktemp("order-voices"),
        warmup=False,
        auth_token=TOKEN,
        metrics_auth_token="metrics-token",
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", -1)]) as ch:
        yield ch


# --------------------------------------------------------------------------- auth before parsing

UNARY = [TTS + "GetVoice", TTS + "CreateVoice", TTS + "ListVoices", RIVA + "Synthesize"]
SERVER_STREAMING = [TTS + "Synthesize", RIVA + "SynthesizeOnline"]


@pytest.mark.parametrize("method", UNARY + SERVER_STREAMING)
def test_garbage_from_an_unauthenticated_caller_is_unauthenticated(
    channel: grpc.Channel, method: str
) -> None:
    """A body that does not parse, from a caller without the token: UNAUTHENTICATED (before,
    the body was parsed first and the caller got INVALID_ARGUMENT with the parse error).
    With the token, the same body is parsed and refused as INVALID_ARGUMENT."""
    if method in UNARY:
        call = channel.unary_unary(method, request_serializer=_raw, response_deserializer=_raw)
        send = lambda md: call(GARBAGE, metadata=md, timeout=30)  # noqa: E731
    else:
        stream = channel.unary_stream(method, request_serializer=_raw, response_deserializer=_raw)
        send = lambda md: list(stream(GARBAGE, metadata=md, timeout=30))  # noqa: E731
    for md in ([], [("authorization", "Bearer wrong")]):
        err = rpc_error(lambda md=md: send(md))  # type: ignore[misc]
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (err.code(), err.details())
        assert "parsed" not in err.details()
    err = rpc_error(lambda: send(GOOD))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert "could not be parsed" in err.details()
    record("auth ordering", f"garbage body to {method} without a token", code="UNAUTHENTICATED",
           with_token=err.code().name)  # fmt: skip


def test_a_big_unauthenticated_body_is_refused_unread(channel: grpc.Channel) -> None:
    """8 MB of reference audio without the token: UNAUTHENTICATED, and the handler that
    refuses it never asks gRPC for the message (it takes the request as a stream it does
    not read)."""
    call = channel.unary_unary(TTS + "CreateVoice", request_serializer=_raw, response_deserializer=_raw)
    body = pb.CreateVoiceRequest(ref_audio=b"\1" * 8_000_000, x_vector_only=True).SerializeToString()
    err = rpc_error(lambda: call(body, timeout=30))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (err.code(), err.details())


def test_unauthenticated_bodies_are_never_parsed() -> None:
    """The auth interceptor in front of a handler whose deserializer counts its calls: a
    caller without the token gets UNAUTHENTICATED and the deserializer is never called (the
    server once parsed up to 11.6 MB for such callers); with the token it parses once."""
    parsed: list[int] = []

    def deserialize(data: bytes) -> pb.GetVoiceRequest:
        parsed.append(len(data))
        return pb.GetVoiceRequest.FromString(data)

    async def get_voice(request: pb.GetVoiceRequest, context: grpc.aio.ServicerContext) -> pb.Voice:
        return pb.Voice(voice_id=request.voice_id)

    async def main() -> list[str]:
        server = grpc.aio.server(interceptors=[BearerAuthInterceptor(TOKEN), UndecodableRequestInterceptor()])
        handler = grpc.unary_unary_rpc_method_handler(
            get_voice, request_deserializer=deserialize, response_serializer=pb.Voice.SerializeToString
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Auth", {"Get": handler}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        seen: list[str] = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                call = ch.unary_unary("/t.Auth/Get", request_serializer=_raw, response_deserializer=_raw)
                body = pb.GetVoiceRequest(voice_id="v" * 100_000).SerializeToString()
                for data, md in ((GARBAGE, ()), (body, ()), (body, (("authorization", "Bearer no"),))):
                    try:
                        await call(data, metadata=md, timeout=30)
                        seen.append("OK")
                    except grpc.aio.AioRpcError as e:
                        seen.append(e.code().name)
                assert parsed == []  # nothing parsed for callers without the token
                await call(body, metadata=GOOD, timeout=30)
                seen.append("OK")
        finally:
            await server.stop(0)
        return seen

    assert asyncio.run(main()) == ["UNAUTHENTICATED"] * 3 + ["OK"]
    assert parsed == [
        len(pb.GetVoiceRequest(voice_id="v" * 100_000).SerializeToString())
    ]  # the authenticated call


def test_streams_refuse_before_reading(channel: grpc.Channel) -> None:
    stub = pb_grpc.TextToSpeechStub(channel)
    raw = channel.stream_stream(TTS + "StreamSynthesize", request_serializer=_raw, response_deserializer=_raw)
    err = rpc_error(lambda: list(raw(iter([GARBAGE]), timeout=30)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (err.code(), err.details())
    err = rpc_error(lambda: list(stub.StreamSynthesize(iter([pb.StreamRequest(text="x")]), timeout=30)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_no_token(channel: grpc.Channel) -> None:
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


# --------------------------------------------------------------------------- the bearer scheme

ACCEPTED = [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER {TOKEN}", f"bEaReR {TOKEN}", f"Bearer  {TOKEN}"]
REFUSED = [
    f"Bearer {TOKEN} ",
    f"Bearer{TOKEN}",
    f"Basic {TOKEN}",
    f"Bearer {TOKEN.upper()}",
    "Bearer",
    "bearer ",
    TOKEN,
    "",
]


@pytest.mark.parametrize("value", ACCEPTED)
def test_the_bearer_scheme_is_case_insensitive(channel: grpc.Channel, value: str) -> None:
    stub = pb_grpc.TextToSpeechStub(channel)
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=[("authorization", value)], timeout=10)
    assert info.model_kind == "base"


@pytest.mark.parametrize("value", REFUSED, ids=[repr(v) for v in REFUSED])
def test_other_authorization_values_are_refused(channel: grpc.Channel, value: str) -> None:
    stub = pb_grpc.TextToSpeechStub(channel)
    err = rpc_error(
        lambda: stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=[("authorization", value)], timeout=10)
    )
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (value, err.code())


def test_bearer_matches() -> None:
    assert all(bearer_matches(v, TOKEN) for v in ACCEPTED)
    assert not any(bearer_matches(v, TOKEN) for v in REFUSED)
    assert not bearer_matches(f"Bearer\t{TOKEN}", TOKEN)  # gRPC clients cannot even send a tab
    assert bearer_matches(f"bearer {TOKEN}".encode(), TOKEN)
    assert not bearer_matches(None, TOKEN)


# --------------------------------------------------------------------------- /metrics


def _get(port: int, path: str, authorization: str | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if authorization is not None:
        req.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_metrics_answer_on_their_path_only(tiny_loaded: Callable[..., Checkpoint], tmp_path: Path) -> None:
    """Without a metrics token /metrics is open (as documented) but no other path answers."""
    srv = start_server(tiny_loaded("base", 0), tmp_path / "voices", warmup=False, load=False)
    try:
        port = srv.metrics_port
        assert port is not None
        assert "qwen3tts_rpcs" in scrape(port)
        for path in ("/", "/anything", "/metrics/x", "/favicon.ico"):
            status, _, _ = _get(port, path)
            assert status == 404, (path, status)
        assert _get(port, "/metrics?name[]=qwen3tts_rpcs_total")[0] == 200
    finally:
        srv.stop()


def test_metrics_token(server: ServerThread) -> None:
    port = server.metrics_port
    assert port is not None
    status, headers, _ = _get(port, "/metrics")
    assert status == 401 and headers.get("WWW-Authenticate", "").startswith("Bearer")
    for wrong in ("Bearer wrong", f"Bearer {TOKEN}", "Basic metrics-token", "metrics-token"):
        assert _get(port, "/metrics", wrong)[0] == 401, wrong
    for right in ("Bearer metrics-token", "bearer metrics-token"):
        status, _, body = _get(port, "/metrics", right)
        assert status == 200 and b"qwen3tts_rpcs_total" in body
    assert _get(port, "/other", "Bearer metrics-token")[0] == 404
    record("auth ordering", "/metrics with --metrics-auth-token", without_token=401, wrong_token=401, token=200,
           other_paths=404)  # fmt: skip


def test_serve_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen3tts_rt import cli
    from qwen3tts_rt.server import app
    from qwen3tts_rt.server.config import ServerConfig

    seen: list[ServerConfig] = []

    async def fake_serve(config: ServerConfig) -> None:
        seen.append(config)

    monkeypatch.setattr(app, "serve", fake_serve)
    monkeypatch.delenv("QWEN3TTS_RT_METRICS_TOKEN", raising=False)
    base = ["serve", "--model", "m", "--device", "cpu", "--dtype", "float32"]
    cli.cmd_serve(cli.build_parser().parse_args(base))
    c = seen[-1]
    assert (c.metrics_auth_token, c.max_unauthenticated_rpcs, c.max_health_watches) == (None, 32, 8)
    cli.cmd_serve(
        cli.build_parser().parse_args(
            [*base, "--metrics-auth-token", "m", "--max-unauthenticated-rpcs", "6", "--max-health-watches", "3",
             "--ref-audio-max-sample-rate", "96000", "--ref-audio-max-channels", "2",
             "--ref-audio-max-decoded-bytes", "1000000"]
        )
    )  # fmt: skip
    c = seen[-1]
    assert (c.metrics_auth_token, c.max_unauthenticated_rpcs, c.max_health_watches) == ("m", 6, 3)
    assert (c.ref_audio.max_sample_rate, c.ref_audio.max_channels, c.ref_audio.max_decoded_bytes) == (
        96000,
        2,
        1_000_000,
    )
    assert c.ref_audio.max_bytes == ServerConfig().ref_audio.max_bytes  # the other rules kept
    with pytest.raises(SystemExit, match="max_health_watches"):
        cli.cmd_serve(cli.build_parser().parse_args([*base, "--max-health-watches", "99"]))
