"""Every broken rule gets INVALID_ARGUMENT naming the field and the rule; the session
limit gets RESOURCE_EXHAUSTED; unknown voices in voice calls get NOT_FOUND."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest

from qwen3tts_rt.audio import write_wav
from qwen3tts_rt.model.checkpoint import Checkpoint
from qwen3tts_rt.server.app import ServerThread
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc
from tests.server_helpers import BidiCall, collect, rpc_error, start_server, wait_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_SESSIONS = 2
MAX_CHARS = 40


@pytest.fixture(scope="module")
def server(
    tiny_loaded: Callable[..., Checkpoint], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    srv = start_server(
        tiny_loaded("base", 0),
        tmp_path_factory.mktemp("voices"),
        max_sessions=MAX_SESSIONS,
        max_utterance_chars=MAX_CHARS,
        max_synthesize_chars=MAX_CHARS,
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.TextToSpeechStub]:
    with grpc.insecure_channel(server.address) as ch:
        yield pb_grpc.TextToSpeechStub(ch)


@pytest.fixture(scope="module")
def custom_stub(
    tiny_loaded: Callable[..., Checkpoint], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[pb_grpc.TextToSpeechStub]:
    srv = start_server(tiny_loaded("custom_voice", 0), tmp_path_factory.mktemp("voices-custom"))
    with grpc.insecure_channel(srv.address) as ch:
        yield pb_grpc.TextToSpeechStub(ch)
    srv.stop()


@pytest.fixture(scope="module")
def voice_id(stub: pb_grpc.TextToSpeechStub, speech_wav: Callable[..., bytes]) -> str:
    return stub.CreateVoice(pb.CreateVoiceRequest(ref_audio=speech_wav(1.2), x_vector_only=True)).voice_id


def config(voice_id: str, **kw: object) -> pb.StreamConfig:
    kw.setdefault("sampling", pb.SamplingParams(greedy=True, max_new_tokens=6))
    return pb.StreamConfig(voice_id=voice_id, **kw)  # type: ignore[arg-type]


def stream_error(stub: pb_grpc.TextToSpeechStub, *requests: pb.StreamRequest) -> grpc.RpcError:
    return rpc_error(lambda: collect(stub.StreamSynthesize(iter(requests), timeout=60)))


def assert_invalid(err: grpc.RpcError, *fragments: str) -> None:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    for frag in fragments:
        assert frag in err.details(), (frag, err.details())


def wav_bytes(x: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    write_wav(buf, x, rate)
    return buf.getvalue()


# --------------------------------------------------------------------------- the stream protocol


def test_missing_config(stub: pb_grpc.TextToSpeechStub) -> None:
    assert_invalid(stream_error(stub), "config", "first message")


def test_text_before_config(stub: pb_grpc.TextToSpeechStub) -> None:
    assert_invalid(stream_error(stub, pb.StreamRequest(text="hi")), "config", "text arrived before config")


def test_empty_first_message(stub: pb_grpc.TextToSpeechStub) -> None:
    assert_invalid(stream_error(stub, pb.StreamRequest()), "config", "first message")


def test_repeated_config(stub: pb_grpc.TextToSpeechStub, voice_id: str) -> None:
    err = stream_error(
        stub,
        pb.StreamRequest(config=config(voice_id)),
        pb.StreamRequest(text="Hi."),
        pb.StreamRequest(config=config(voice_id)),
    )
    assert_invalid(err, "config", "exactly once")


def test_empty_later_message(stub: pb_grpc.TextToSpeechStub, voice_id: str) -> None:
    err = stream_error(stub, pb.StreamRequest(config=config(voice_id)), pb.StreamRequest())
    assert_invalid(err, "request", "set one of")


# --------------------------------------------------------------------------- config fields


@pytest.mark.parametrize(
    ("cfg", "fragments"),
    [
        (lambda v: pb.StreamConfig(voice_id="no-such-voice-id"), ["config.voice_id", "unknown voice"]),
        (lambda v: pb.StreamConfig(voice_id="../../etc/passwd"), ["config.voice_id", "unknown voice"]),
        (lambda v: pb.StreamConfig(), ["config.voice", "cloned voice"]),
        (lambda v: pb.StreamConfig(speaker="vivian"), ["config.speaker", "CustomVoice"]),
        (lambda v: config(v, instruct="Speak softly."), ["config.instruct", "Base"]),
        (lambda v: config(v, language="klingon"), ["config.language", "klingon", "english"]),
        (lambda v: config(v, sample_rate_hz=11000), ["config.sample_rate_hz", "11000", "44100"]),
        (lambda v: config(v, encoding=99), ["config.encoding", "PCM_S16LE"]),
        (
            lambda v: config(v, sampling=pb.SamplingParams(temperature=0.0)),
            ["config.sampling.temperature", "0 < temperature"],
        ),
        (lambda v: config(v, sampling=pb.SamplingParams(top_p=1.5)), ["config.sampling.top_p", "top_p <= 1"]),
        (lambda v: config(v, sampling=pb.SamplingParams(top_k=-1)), ["config.sampling.top_k", "0 <= top_k"]),
        (
            lambda v: config(v, sampling=pb.SamplingParams(repetition_penalty=9)),
            ["config.sampling.repetition_penalty"],
        ),
        (
            lambda v: config(v, sampling=pb.SamplingParams(max_new_tokens=0)),
            ["config.sampling.max_new_tokens"],
        ),
        (
            lambda v: config(v, sampling=pb.SamplingParams(subtalker_top_p=0)),
            ["config.sampling.subtalker_top_p"],
        ),
        (lambda v: config(v, first_packet_frames=500), ["config.first_packet_frames", "<= 100"]),
        (lambda v: config(v, packet_frames=-1), ["config.packet_frames", "1 <="]),
        (lambda v: config(v, seed=2**64 - 1), ["config.seed", "out of range"]),
    ],
    ids=lambda x: "" if callable(x) else x[0],
)
def test_bad_config_fields(
    stub: pb_grpc.TextToSpeechStub, voice_id: str, cfg: Callable[[str], pb.StreamConfig], fragments: list[str]
) -> None:
    err = stream_error(stub, pb.StreamRequest(config=cfg(voice_id)), pb.StreamRequest(text="Hi."))
    assert_invalid(err, *fragments)
    # the same rules hold for Synthesize
    err = rpc_error(lambda: list(stub.Synthesize(pb.SynthesizeRequest(config=cfg(voice_id), text="Hi."))))
    assert_invalid(err, *fragments)


def test_unknown_speaker_on_custom_voice(custom_stub: pb_grpc.TextToSpeechStub) -> None:
    err = stream_error(custom_stub, pb.StreamRequest(config=pb.StreamConfig(speaker="nobody")))
    assert_invalid(err, "config.speaker", "unknown speaker 'nobody'", "vivian")
    err = stream_error(custom_stub, pb.StreamRequest(config=pb.StreamConfig()))
    assert_invalid(err, "config.speaker", "needs a speaker")
    err = stream_error(custom_stub, pb.StreamRequest(config=pb.StreamConfig(voice_id="abcdefghijkl")))
    assert_invalid(err, "config.voice_id", "unknown voice")


def test_speaker_on_custom_voice_speaks(custom_stub: pb_grpc.TextToSpeechStub) -> None:
    cfg = pb.StreamConfig(speaker="Vivian", sampling=pb.SamplingParams(greedy=True, max_new_tokens=4))
    got = collect(
        custom_stub.StreamSynthesize(iter([pb.StreamRequest(config=cfg), pb.StreamRequest(text="Hi.")]))
    )
    assert got.dones[0].frames == 3


# --------------------------------------------------------------------------- text limits


def test_stream_text_over_the_limit(stub: pb_grpc.TextToSpeechStub, voice_id: str) -> None:
    deltas = [pb.StreamRequest(text="x" * 15) for _ in range(3)]  # 45 > 40 characters
    err = stream_error(stub, pb.StreamRequest(config=config(voice_id)), *deltas)
    assert_invalid(err, "text", f"{MAX_CHARS} characters", "max_utterance_chars")


def test_limit_is_per_utterance(stub: pb_grpc.TextToSpeechStub, voice_id: str) -> None:
    call = BidiCall(stub).send(config=config(voice_id))
    call.text("x" * 30).flush().text("y" * 30).close()
    assert len(collect(call).dones) == 2


def test_synthesize_text_rules(stub: pb_grpc.TextToSpeechStub, voice_id: str) -> None:
    err = rpc_error(
        lambda: list(stub.Synthesize(pb.SynthesizeRequest(config=config(voice_id), text="x" * 41)))
    )
    assert_invalid(err, "text", "max_synthesize_chars")
    err = rpc_error(lambda: list(stub.Synthesize(pb.SynthesizeRequest(config=config(voice_id), text="  "))))
    assert_invalid(err, "text", "empty")


# --------------------------------------------------------------------------- reference audio


def _tone(seconds: float, rate: int, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


@pytest.mark.parametrize(
    ("audio", "ref_text", "x_vector_only", "fragments"),
    [
        (b"", "", True, ["ref_audio", "empty"]),
        (b"this is not audio at all" * 10, "", True, ["ref_audio"]),
        (wav_bytes(_tone(0.4, 24000), 24000), "", True, ["ref_audio", "1 s"]),
        (wav_bytes(_tone(2.0, 24000, amp=0.0), 24000), "", True, ["ref_audio", "silent"]),
        (wav_bytes(_tone(2.0, 16000), 16000), "", True, ["ref_audio", "16000"]),
        (wav_bytes(_tone(2.0, 24000), 24000), "", False, ["ref_text", "transcript"]),
    ],
    ids=["empty", "garbage", "too-short", "silent", "low-rate", "no-transcript"],
)
def test_bad_reference_audio(
    stub: pb_grpc.TextToSpeechStub, audio: bytes, ref_text: str, x_vector_only: bool, fragments: list[str]
) -> None:
    req = pb.CreateVoiceRequest(ref_audio=audio, ref_text=ref_text, x_vector_only=x_vector_only)
    assert_invalid(rpc_error(lambda: stub.CreateVoice(req)), *fragments)
    clone = pb.ClonePrompt(ref_audio=audio, ref_text=ref_text, x_vector_only=x_vector_only)
    err = stream_error(stub, pb.StreamRequest(config=pb.StreamConfig(clone=clone)))
    assert_invalid(err, *[f"config.clone.{f}" if f in ("ref_audio", "ref_text") else f for f in fragments])


def test_reference_audio_over_the_size_limit(stub: pb_grpc.TextToSpeechStub) -> None:
    err = rpc_error(lambda: stub.CreateVoice(pb.CreateVoiceRequest(ref_audio=b"\0" * (10 * 1024 * 1024 + 1))))
    assert_invalid(err, "ref_audio", "10 MiB")


def test_display_name_rule(stub: pb_grpc.TextToSpeechStub, speech_wav: Callable[..., bytes]) -> None:
    req = pb.CreateVoiceRequest(ref_audio=speech_wav(1.2), x_vector_only=True, display_name="x" * 201)
    assert_invalid(rpc_error(lambda: stub.CreateVoice(req)), "display_name", "200")


# --------------------------------------------------------------------------- voices: not found


def test_unknown_voice_in_voice_calls(stub: pb_grpc.TextToSpeechStub) -> None:
    for fn in (
        lambda: stub.GetVoice(pb.GetVoiceRequest(voice_id="abcdefghijkl")),
        lambda: stub.DeleteVoice(pb.DeleteVoiceRequest(voice_id="abcdefghijkl")),
        lambda: stub.GetVoice(pb.GetVoiceRequest(voice_id="../../../etc/passwd")),
        lambda: stub.DeleteVoice(pb.DeleteVoiceRequest(voice_id="")),
    ):
        assert rpc_error(fn).code() == grpc.StatusCode.NOT_FOUND


# --------------------------------------------------------------------------- capacity


def test_resource_exhausted_at_the_session_limit(
    server: ServerThread, stub: pb_grpc.TextToSpeechStub, voice_id: str
) -> None:
    calls = []
    for _ in range(MAX_SESSIONS):
        call = BidiCall(stub).send(
            config=config(voice_id, sampling=pb.SamplingParams(greedy=True, max_new_tokens=3000))
        )
        call.text("Hold the line.")
        next(iter(call))  # the session is open and speaking
        calls.append(call)
    err = stream_error(stub, pb.StreamRequest(config=config(voice_id)), pb.StreamRequest(text="Hi."))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_sessions" in err.details() and str(MAX_SESSIONS) in err.details()
    err = rpc_error(lambda: list(stub.Synthesize(pb.SynthesizeRequest(config=config(voice_id), text="Hi."))))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    calls[0].cancel()
    engine = server.server.runtime.engine
    assert engine is not None
    assert wait_for(lambda: engine.live_sessions == MAX_SESSIONS - 1)
    got = collect(
        stub.StreamSynthesize(iter([pb.StreamRequest(config=config(voice_id)), pb.StreamRequest(text="Hi.")]))
    )
    assert len(got.dones) == 1
    calls[1].cancel()
    assert wait_for(lambda: engine.live_sessions == 0)
