"""The gRPC server end to end on the tiny checkpoint: streamed text gives the audio of
the whole-text synthesis, utterances, cancel, disconnects and deadlines free sessions,
output formats, server info, reflection and the /metrics endpoint."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from qwen3tts_rt.audio import SUPPORTED_OUTPUT_RATES, lin2ulaw, resample
from qwen3tts_rt.engine.synth import synthesize
from qwen3tts_rt.engine.voices import create_voice_clone_prompt, voice_prompt
from qwen3tts_rt.model.checkpoint import Checkpoint
from qwen3tts_rt.model.prompt import VoicePrompt
from qwen3tts_rt.model.sampling import SamplingParams
from qwen3tts_rt.server.app import ServerThread
from qwen3tts_rt.server.client import llm_tokens
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc
from tests.server_helpers import (
    BidiCall,
    assert_pcm_close,
    collect,
    int16,
    rpc_error,
    sample,
    scrape,
    start_server,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FRAMES = 24  # max_new_tokens: utterances end by the frame cap after FRAMES - 1 frames
TEXT = "Hello there, how are you?"


@pytest.fixture(scope="module")
def ckpt(tiny_loaded: Callable[..., Checkpoint]) -> Checkpoint:
    return tiny_loaded("base", 0)


@pytest.fixture(scope="module")
def server(ckpt: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    # bit-exact comparisons with one-frame decodes: fixed packets (adaptive: test_server_packets.py)
    srv = start_server(ckpt, tmp_path_factory.mktemp("voices"), max_sessions=4, packet_policy="fixed")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.TextToSpeechStub]:
    with grpc.insecure_channel(server.address) as ch:
        yield pb_grpc.TextToSpeechStub(ch)


@pytest.fixture(scope="module")
def ref_wav(speech_wav: Callable[..., bytes]) -> bytes:
    return speech_wav(1.5)


@pytest.fixture(scope="module")
def voice_id(stub: pb_grpc.TextToSpeechStub, ref_wav: bytes) -> str:
    return stub.CreateVoice(
        pb.CreateVoiceRequest(ref_audio=ref_wav, x_vector_only=True, display_name="t")
    ).voice_id


@pytest.fixture(scope="module")
def prompt(ckpt: Checkpoint, ref_wav: bytes) -> VoicePrompt:
    clone = create_voice_clone_prompt(ckpt, ref_wav, x_vector_only=True, allow_paths=False)
    return voice_prompt(ckpt, clone=clone)


def greedy_config(voice_id: str, frames: int = FRAMES, **kw: object) -> pb.StreamConfig:
    return pb.StreamConfig(
        voice_id=voice_id,
        language="english",
        sampling=pb.SamplingParams(greedy=True, max_new_tokens=frames),
        **kw,  # type: ignore[arg-type]
    )


def reference(ckpt: Checkpoint, prompt: VoicePrompt, text: str, frames: int = FRAMES) -> np.ndarray:
    """What `synth --greedy --max-new-tokens FRAMES` gives, as float samples at 24 kHz."""
    params = SamplingParams.from_generation_config(
        ckpt.generation_config, do_sample=False, subtalker_do_sample=False, max_new_tokens=frames
    )
    return synthesize(ckpt, prompt, text, "english", params).wav


# --------------------------------------------------------------------------- exactness


def test_streamed_deltas_equal_whole_text_synthesis(
    stub: pb_grpc.TextToSpeechStub, voice_id: str, ckpt: Checkpoint, prompt: VoicePrompt
) -> None:
    deltas = llm_tokens(TEXT, max_chars=3)
    assert len(deltas) > 6 and "".join(deltas) == TEXT

    def requests() -> Iterator[pb.StreamRequest]:
        yield pb.StreamRequest(config=greedy_config(voice_id))
        for d in deltas:
            time.sleep(0.01)  # arrive while the talker runs, as an LLM's tokens do
            yield pb.StreamRequest(text=d)

    got = collect(stub.StreamSynthesize(requests(), timeout=120))
    want = int16(reference(ckpt, prompt, TEXT))
    assert [d.utterance_id for d in got.dones] == [0]
    done = got.dones[0]
    assert done.reason == pb.UtteranceDone.CAP  # random weights never emit EOS
    assert done.frames == FRAMES - 1
    assert done.first_packet_latency_ms > 0 and done.real_time_factor > 0
    assert len(want) == (FRAMES - 1) * 1920
    np.testing.assert_array_equal(got.pcm(0), want)
    # chunks are in order, contiguous, one frame each by default
    assert [c.sequence_number for c in got.chunks] == list(range(len(got.chunks)))
    assert [c.sample_offset for c in got.chunks] == [1920 * i for i in range(len(got.chunks))]
    chars = [p.chars_consumed for p in got.progress]
    assert chars == sorted(chars) and chars[-1] == len(TEXT)


def test_inline_clone_equals_stored_voice(
    stub: pb_grpc.TextToSpeechStub, ref_wav: bytes, ckpt: Checkpoint, prompt: VoicePrompt
) -> None:
    cfg = pb.StreamConfig(
        clone=pb.ClonePrompt(ref_audio=ref_wav, x_vector_only=True),
        language="english",
        sampling=pb.SamplingParams(greedy=True, max_new_tokens=FRAMES),
        first_packet_frames=2,
        packet_frames=3,
    )
    got = collect(stub.StreamSynthesize(iter([pb.StreamRequest(config=cfg), pb.StreamRequest(text=TEXT)])))
    assert_pcm_close(got.pcm(0), int16(reference(ckpt, prompt, TEXT)))  # 2- and 3-frame decoder calls
    sizes = [len(c.audio) // 2 for c in got.chunks]
    assert sizes[0] == 2 * 1920 and set(sizes[1:-1]) == {3 * 1920}


def test_several_utterances_on_one_stream(
    stub: pb_grpc.TextToSpeechStub, voice_id: str, ckpt: Checkpoint, prompt: VoicePrompt
) -> None:
    texts = ["Good morning.", "See you soon!"]
    call = BidiCall(stub).send(config=greedy_config(voice_id))
    call.text("Good ", "morning.").flush("first").text("See you", " soon!").flush("second").close()
    got = collect(call)
    assert [(d.utterance_id, d.client_id) for d in got.dones] == [(0, "first"), (1, "second")]
    for uid, text in enumerate(texts):
        np.testing.assert_array_equal(got.pcm(uid), int16(reference(ckpt, prompt, text)))
    # audio of utterance 1 follows all of utterance 0 on the stream; offsets restart per utterance
    uids = [c.utterance_id for c in got.chunks]
    assert uids == sorted(uids)
    assert next(c.sample_offset for c in got.chunks if c.utterance_id == 1) == 0


def test_cancel_mid_utterance_drops_its_audio(stub: pb_grpc.TextToSpeechStub, voice_id: str) -> None:
    call = (
        BidiCall(stub).send(config=greedy_config(voice_id, frames=400)).text("A long sentence to interrupt.")
    )
    seen: list[pb.StreamResponse] = []
    cancelled = threading.Event()

    def on_response(r: pb.StreamResponse) -> None:
        seen.append(r)
        if r.WhichOneof("response") == "audio" and not cancelled.is_set():
            cancelled.set()
            call.send(cancel=pb.Cancel()).text("After.").close()

    got = collect(call, on_response)
    assert [(d.utterance_id, d.reason) for d in got.dones] == [
        (0, pb.UtteranceDone.CANCELLED),
        (1, pb.UtteranceDone.CAP),
    ]
    assert got.dones[0].frames < 399  # stopped long before its cap
    kinds = [(r.WhichOneof("response"), r.audio.utterance_id) for r in seen]
    first_done = next(i for i, r in enumerate(seen) if r.WhichOneof("response") == "utterance_done")
    assert ("audio", 0) not in kinds[first_done:]  # nothing of the cancelled utterance after its end
    assert len(got.pcm(1)) > 0


def test_empty_deltas_and_flush_without_text(stub: pb_grpc.TextToSpeechStub, voice_id: str) -> None:
    call = BidiCall(stub).send(config=greedy_config(voice_id, frames=6))
    call.text("", "Hi", "", ".").flush("a").flush("empty").close()
    got = collect(call)
    assert [d.client_id for d in got.dones] == ["a", "empty"]
    assert got.dones[1].frames == 0 and 1 not in got.audio


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("rate", [16000, 44100])
def test_synthesize_resamples_exactly(
    stub: pb_grpc.TextToSpeechStub, voice_id: str, ckpt: Checkpoint, prompt: VoicePrompt, rate: int
) -> None:
    packets = list(
        stub.Synthesize(pb.SynthesizeRequest(config=greedy_config(voice_id, sample_rate_hz=rate), text=TEXT))
    )
    assert packets[-1].last and not any(p.last for p in packets[:-1])
    pcm = np.frombuffer(b"".join(p.audio for p in packets), dtype="<i2")
    want = int16(resample(reference(ckpt, prompt, TEXT), 24000, rate))
    np.testing.assert_array_equal(pcm, want)
    assert abs(len(pcm) - (FRAMES - 1) * 0.08 * rate) <= 2


def test_encodings(
    stub: pb_grpc.TextToSpeechStub, voice_id: str, ckpt: Checkpoint, prompt: VoicePrompt
) -> None:
    wav = reference(ckpt, prompt, TEXT)
    req = pb.SynthesizeRequest(config=greedy_config(voice_id, encoding=pb.FLOAT32_LE), text=TEXT)
    f32 = np.frombuffer(b"".join(p.audio for p in stub.Synthesize(req)), dtype="<f4")
    np.testing.assert_allclose(f32, np.clip(wav, -1, 1), atol=0)
    req = pb.SynthesizeRequest(
        config=greedy_config(voice_id, encoding=pb.MULAW, sample_rate_hz=8000), text=TEXT
    )
    ulaw = np.frombuffer(b"".join(p.audio for p in stub.Synthesize(req)), dtype=np.uint8)
    np.testing.assert_array_equal(ulaw, lin2ulaw(int16(resample(wav, 24000, 8000))))


def test_server_info(stub: pb_grpc.TextToSpeechStub, ckpt: Checkpoint) -> None:
    info = stub.GetServerInfo(pb.GetServerInfoRequest())
    assert info.model_kind == "base" and info.model_id == str(ckpt.path)
    assert "english" in info.languages and "auto" in info.languages
    assert list(info.sample_rates_hz) == list(SUPPORTED_OUTPUT_RATES)
    assert set(info.encodings) == {pb.PCM_S16LE, pb.FLOAT32_LE, pb.MULAW, pb.ALAW}
    assert info.limits.max_sessions == 4 and info.limits.max_ref_audio_bytes == 10 * 1024 * 1024
    assert info.limits.max_message_bytes > info.limits.max_ref_audio_bytes
    assert info.packets.policy == pb.PACKET_POLICY_FIXED  # this module's server: --packet-policy fixed
    assert (info.packets.first_packet_frames, info.packets.packet_frames) == (1, 1)


# --------------------------------------------------------------------------- freeing sessions


def _live(server: ServerThread) -> int:
    assert server.server.runtime.engine is not None
    return server.server.runtime.engine.live_sessions


def test_client_disconnect_frees_the_session(
    server: ServerThread, stub: pb_grpc.TextToSpeechStub, voice_id: str
) -> None:
    call = (
        BidiCall(stub)
        .send(config=greedy_config(voice_id, frames=2000))
        .text("Keep talking for a long while.")
    )
    for r in call:
        if r.WhichOneof("response") == "audio":
            break
    assert _live(server) == 1
    assert server.metrics_port is not None
    assert sample(scrape(server.metrics_port), "qwen3tts_live_sessions", "qwen3tts_live_sessions") == 1
    call.cancel()  # the client goes away mid-utterance
    assert wait_for(lambda: _live(server) == 0, timeout=2.0)
    gauge = sample(scrape(server.metrics_port), "qwen3tts_live_sessions", "qwen3tts_live_sessions")
    assert gauge == 0


def test_deadline_frees_the_session(
    server: ServerThread, stub: pb_grpc.TextToSpeechStub, voice_id: str
) -> None:
    call = (
        BidiCall(stub, timeout=1.0)
        .send(config=greedy_config(voice_id, frames=2000))
        .text("Talk past the deadline.")
    )
    err = rpc_error(lambda: collect(call))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: _live(server) == 0, timeout=2.0)


# --------------------------------------------------------------------------- reflection and metrics


def test_reflection_lists_the_services(server: ServerThread) -> None:
    with grpc.insecure_channel(server.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(
            stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        )
        names = {s.name for s in resp.list_services_response.service}
        assert {
            "qwen3tts_rt.v1.TextToSpeech",
            "nvidia.riva.tts.RivaSpeechSynthesis",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= names
        req = reflection_pb2.ServerReflectionRequest(file_containing_symbol="qwen3tts_rt.v1.TextToSpeech")
        resp = next(stub.ServerReflectionInfo(iter([req])))
        assert resp.file_descriptor_response.file_descriptor_proto


def test_metrics_show_histograms_after_traffic(
    server: ServerThread, stub: pb_grpc.TextToSpeechStub, voice_id: str
) -> None:
    collect(
        stub.StreamSynthesize(
            iter([pb.StreamRequest(config=greedy_config(voice_id)), pb.StreamRequest(text="Hi.")])
        )
    )
    assert server.metrics_port is not None
    fam = scrape(server.metrics_port)
    for name in (
        "qwen3tts_first_packet_latency_seconds",
        "qwen3tts_time_to_first_audio_seconds",
        "qwen3tts_inter_packet_gap_seconds",
        "qwen3tts_real_time_factor",
        "qwen3tts_queue_wait_seconds",
    ):
        assert fam[name].type == "histogram"
        assert sample(fam, name, f"{name}_count", api="tts") >= 1, name
        buckets = [s for s in fam[name].samples if s.name == f"{name}_bucket" and s.labels["api"] == "tts"]
        bounds = [float(s.labels["le"]) for s in buckets]
        if name != "qwen3tts_real_time_factor":
            assert 0.005 in bounds and 2.0 in bounds and sum(0.005 <= b <= 2.0 for b in bounds) >= 20
    assert sample(fam, "qwen3tts_batch_size", "qwen3tts_batch_size_count") >= 1
    assert sample(fam, "qwen3tts_rpcs", "qwen3tts_rpcs_total", method="StreamSynthesize", code="OK") >= 1
    assert sample(fam, "qwen3tts_rpcs", "qwen3tts_rpcs_total", method="GetServerInfo", code="OK") >= 0
    assert sample(fam, "qwen3tts_utterances", "qwen3tts_utterances_total", api="tts", reason="cap") >= 1


def test_rpc_counter_counts_errors(server: ServerThread, stub: pb_grpc.TextToSpeechStub) -> None:
    rpc_error(lambda: stub.GetVoice(pb.GetVoiceRequest(voice_id="nope-nope-nope")))
    assert server.metrics_port is not None
    fam = scrape(server.metrics_port)
    assert sample(fam, "qwen3tts_rpcs", "qwen3tts_rpcs_total", method="GetVoice", code="NOT_FOUND") >= 1


def test_voice_store_files(server: ServerThread, voice_id: str) -> None:
    root = Path(server.server.config.voices_dir)
    assert (root / f"{voice_id}.json").is_file() and (root / f"{voice_id}.safetensors").is_file()
    assert not list(root.glob(".tmp-*"))
