"""Packet policies over gRPC, on a server with the default settings (adaptive packets):
the audio is the one-frame decode of the same frames to within 1 LSB, whatever packets the
policy chose; a stream may ask for fixed packets; bad packet settings name themselves; the
packet and decoder metrics count what was sent. Which packets the adaptive policy picks
depends on the clock (tested deterministically in test_core.py and test_engine.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest

from qwen3tts_rt.engine.synth import synthesize
from qwen3tts_rt.engine.voices import create_voice_clone_prompt, voice_prompt
from qwen3tts_rt.model.checkpoint import Checkpoint
from qwen3tts_rt.model.sampling import SamplingParams
from qwen3tts_rt.server.app import ServerThread
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc
from tests.server_helpers import (
    assert_pcm_close,
    collect,
    greedy,
    int16,
    rpc_error,
    sample,
    scrape,
    start_server,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FRAMES = 40  # max_new_tokens: 39 frames, 3.1 s
TEXT = "Hello there, how are you doing on this fine and sunny day?"
SAMPLES_PER_FRAME = 1920


@pytest.fixture(scope="module")
def ckpt(tiny_loaded: Callable[..., Checkpoint]) -> Checkpoint:
    return tiny_loaded("base", 0)


@pytest.fixture(scope="module")
def server(ckpt: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    srv = start_server(ckpt, tmp_path_factory.mktemp("voices"), max_sessions=2, warmup=False)
    assert srv.server.config.engine.packet_policy == "adaptive"  # the default
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.TextToSpeechStub]:
    with grpc.insecure_channel(server.address) as ch:
        yield pb_grpc.TextToSpeechStub(ch)


def test_server_info_says_the_packet_defaults(stub: pb_grpc.TextToSpeechStub) -> None:
    got = stub.GetServerInfo(pb.GetServerInfoRequest()).packets
    want = pb.PacketDefaults(
        policy=pb.PACKET_POLICY_ADAPTIVE,
        first_packet_frames=1,
        packet_frames=1,
        max_packet_frames=8,
        margin_s=0.25,
    )
    assert got == want


@pytest.fixture(scope="module")
def ref_wav(speech_wav: Callable[..., bytes]) -> bytes:
    return speech_wav(1.5)


@pytest.fixture(scope="module")
def voice_id(stub: pb_grpc.TextToSpeechStub, ref_wav: bytes) -> str:
    return stub.CreateVoice(pb.CreateVoiceRequest(ref_audio=ref_wav, x_vector_only=True)).voice_id


def _stream(stub: pb_grpc.TextToSpeechStub, cfg: pb.StreamConfig) -> tuple[list[int], bytes]:
    got = collect(stub.StreamSynthesize(iter([pb.StreamRequest(config=cfg), pb.StreamRequest(text=TEXT)])))
    assert [d.frames for d in got.dones] == [FRAMES - 1]
    sizes = [len(c.audio) // 2 for c in got.chunks]
    offsets = [c.sample_offset for c in got.chunks]
    assert offsets == [sum(sizes[:i]) for i in range(len(sizes))]  # contiguous, nothing lost
    assert all(n % SAMPLES_PER_FRAME == 0 for n in sizes)
    return [n // SAMPLES_PER_FRAME for n in sizes], bytes(got.audio[0])


def test_default_adaptive_stream_is_the_one_frame_decode(
    stub: pb_grpc.TextToSpeechStub, server: ServerThread, voice_id: str, ckpt: Checkpoint, ref_wav: bytes
) -> None:
    before = scrape(server.metrics_port)
    frames, audio = _stream(stub, greedy(voice_id, FRAMES))
    after = scrape(server.metrics_port)
    assert frames[0] == 1 and sum(frames) == FRAMES - 1 and max(frames) <= 8
    params = SamplingParams.from_generation_config(
        ckpt.generation_config, do_sample=False, subtalker_do_sample=False, max_new_tokens=FRAMES
    )
    prompt = voice_prompt(ckpt, clone=create_voice_clone_prompt(ckpt, ref_wav, x_vector_only=True))
    want = int16(synthesize(ckpt, prompt, TEXT, "english", params).wav)
    assert_pcm_close(np.frombuffer(audio, dtype="<i2"), want)

    def delta(family: str, name: str, **labels: str) -> float:
        return sample(after, family, name, **labels) - sample(before, family, name, **labels)

    assert delta("qwen3tts_packet_frames", "qwen3tts_packet_frames_count", api="tts") == len(frames)
    assert delta("qwen3tts_packet_frames", "qwen3tts_packet_frames_sum", api="tts") == FRAMES - 1
    assert delta("qwen3tts_decoded_frames", "qwen3tts_decoded_frames_total") == FRAMES - 1
    calls = delta("qwen3tts_decoder_calls", "qwen3tts_decoder_calls_total")
    assert calls == len(frames)  # one stream: one decoder call per packet


def test_a_stream_may_ask_for_fixed_packets(stub: pb_grpc.TextToSpeechStub, voice_id: str) -> None:
    frames, _ = _stream(stub, greedy(voice_id, FRAMES, packet_policy=pb.PACKET_POLICY_FIXED, packet_frames=3))
    assert frames[0] == 1 and set(frames[1:-1]) == {3}
    frames, _ = _stream(stub, greedy(voice_id, FRAMES, packet_frames=2))  # a size alone means fixed
    assert frames[0] == 1 and set(frames[1:-1]) == {2}
    frames, _ = _stream(stub, greedy(voice_id, FRAMES, max_packet_frames=1))  # adaptive, bound 1
    assert set(frames) == {1}


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"packet_policy": 7}, "config.packet_policy"),
        ({"max_packet_frames": 101}, "config.max_packet_frames"),
        ({"max_packet_frames": -1}, "config.max_packet_frames"),
    ],
)
def test_bad_packet_settings_are_invalid_arguments(
    stub: pb_grpc.TextToSpeechStub, voice_id: str, kw: dict[str, int], field: str
) -> None:
    cfg = greedy(voice_id, FRAMES, **kw)
    e = rpc_error(lambda: collect(stub.StreamSynthesize(iter([pb.StreamRequest(config=cfg)]))))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and field in (e.details() or ""), e.details()
