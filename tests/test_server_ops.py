"""Operating the server: health states, graceful drain, voices surviving a restart,
bearer-token auth, TLS, and the ``serve``/``say``/``voice`` commands in a real process
(SIGTERM drain, and the plain message when the default model is not available)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from qwen3tts_rt.audio import read_wav
from qwen3tts_rt.model.checkpoint import Checkpoint
from qwen3tts_rt.server.voice_store import VoiceStore
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc
from tests.server_helpers import BidiCall, collect, drain_in_background, rpc_error, start_server, wait_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TTS = "qwen3tts_rt.v1.TextToSpeech"
RIVA = "nvidia.riva.tts.RivaSpeechSynthesis"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt(tiny_loaded: Callable[..., Checkpoint]) -> Checkpoint:
    return tiny_loaded("base", 0)


def greedy(voice_id: str, frames: int = 12) -> pb.StreamConfig:
    """Greedy, with fixed 1-frame packets: its audio is compared bit for bit across runs, and
    adaptive packets group frames by timing (1-LSB rounding differences between groupings)."""
    return pb.StreamConfig(
        voice_id=voice_id,
        sampling=pb.SamplingParams(greedy=True, max_new_tokens=frames),
        packet_policy=pb.PACKET_POLICY_FIXED,
    )


def health_status(ch: grpc.Channel, service: str = "") -> int:
    return (
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
    )


# --------------------------------------------------------------------------- health and drain


def test_health_follows_loading_and_drain(
    ckpt: Checkpoint, tmp_path: Path, speech_wav: Callable[..., bytes]
) -> None:
    srv = start_server(ckpt, tmp_path / "voices", load=False)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.TextToSpeechStub(ch)
            for service in ("", TTS, RIVA):
                assert health_status(ch, service) == NOT_SERVING
            err = rpc_error(lambda: stub.GetServerInfo(pb.GetServerInfoRequest()))
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.details()

            srv.load()  # model loaded and warmed up
            for service in ("", TTS, RIVA):
                assert health_status(ch, service) == SERVING
            vid = stub.CreateVoice(
                pb.CreateVoiceRequest(ref_audio=speech_wav(1.2), x_vector_only=True)
            ).voice_id

            # a stream in flight when the drain starts finishes; new calls are refused
            call = BidiCall(stub).send(config=greedy(vid, frames=40)).text("Finish this sentence.").close()
            responses = iter(call)
            first = next(responses)
            drainer = drain_in_background(srv, grace_s=30)
            assert wait_for(lambda: health_status(ch) == NOT_SERVING)
            assert health_status(ch, TTS) == NOT_SERVING
            err = rpc_error(lambda: stub.GetServerInfo(pb.GetServerInfoRequest()))
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.details()
            rest = collect(responses)
            assert first.WhichOneof("response") == "audio"
            assert [d.reason for d in rest.dones] == [pb.UtteranceDone.CAP] and rest.dones[0].frames == 39
            drainer.join(10)
            assert not drainer.is_alive()
    finally:
        srv.stop()


def test_drain_grace_cancels_what_is_left(
    ckpt: Checkpoint, tmp_path: Path, speech_wav: Callable[..., bytes]
) -> None:
    srv = start_server(ckpt, tmp_path / "voices")
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.TextToSpeechStub(ch)
            vid = stub.CreateVoice(
                pb.CreateVoiceRequest(ref_audio=speech_wav(1.2), x_vector_only=True)
            ).voice_id
            call = BidiCall(stub).send(config=greedy(vid, frames=5000)).text("Never finishes in time.")
            responses = iter(call)
            next(responses)
            t0 = time.monotonic()
            srv.stop(grace_s=0.5)
            assert time.monotonic() - t0 < 5
            err = rpc_error(lambda: collect(responses))
            assert err.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    finally:
        srv.stop()


# --------------------------------------------------------------------------- voices persist


def test_voices_survive_a_restart(ckpt: Checkpoint, tmp_path: Path, speech_wav: Callable[..., bytes]) -> None:
    voices = tmp_path / "voices"
    text = "Same voice after a restart."
    srv = start_server(ckpt, voices)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.TextToSpeechStub(ch)
            ref = speech_wav(1.5, seed=1)
            xv = stub.CreateVoice(pb.CreateVoiceRequest(ref_audio=ref, x_vector_only=True, display_name="xv"))
            again = stub.CreateVoice(
                pb.CreateVoiceRequest(ref_audio=ref, x_vector_only=True, display_name="xv")
            )
            assert again.voice_id == xv.voice_id  # computed once: the same request returns the same voice
            icl = stub.CreateVoice(
                pb.CreateVoiceRequest(
                    ref_audio=speech_wav(1.5, seed=2), ref_text="Some words.", display_name="icl"
                )
            )
            gone = stub.CreateVoice(
                pb.CreateVoiceRequest(ref_audio=speech_wav(1.5, seed=4), x_vector_only=True)
            )
            stub.DeleteVoice(pb.DeleteVoiceRequest(voice_id=gone.voice_id))
            before = {v.voice_id: v for v in stub.ListVoices(pb.ListVoicesRequest()).voices}
            assert set(before) == {xv.voice_id, icl.voice_id}
            assert not before[icl.voice_id].x_vector_only and before[icl.voice_id].ref_text == "Some words."
            cfgs = {vid: greedy(vid) for vid in before}
            audio_before = {
                vid: collect(
                    stub.StreamSynthesize(iter([pb.StreamRequest(config=c), pb.StreamRequest(text=text)]))
                ).pcm(0)
                for vid, c in cfgs.items()
            }
    finally:
        srv.stop()
    (voices / "ORPHANxxxxxxxx.safetensors").write_bytes(b"half-written")  # a crash between the two files
    (voices / ".tmp-crashed").write_bytes(b"x")
    srv = start_server(ckpt, voices)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.TextToSpeechStub(ch)
            after = {v.voice_id: v for v in stub.ListVoices(pb.ListVoicesRequest()).voices}
            assert after == before
            assert stub.GetVoice(pb.GetVoiceRequest(voice_id=icl.voice_id)) == before[icl.voice_id]
            for vid, c in cfgs.items():
                got = collect(
                    stub.StreamSynthesize(iter([pb.StreamRequest(config=c), pb.StreamRequest(text=text)]))
                )
                np.testing.assert_array_equal(got.pcm(0), audio_before[vid])
    finally:
        srv.stop()
    assert not (voices / "ORPHANxxxxxxxx.safetensors").exists() and not (voices / ".tmp-crashed").exists()
    assert sorted(p.name for p in voices.iterdir()) == sorted(
        f"{vid}{ext}" for vid in before for ext in (".json", ".safetensors")
    )
    assert len(VoiceStore(voices, "weights-of-another-model", max_voices=10, cache_bytes=1 << 20)) == 0


# --------------------------------------------------------------------------- auth and TLS


def test_bearer_token_auth(ckpt: Checkpoint, tmp_path: Path) -> None:
    srv = start_server(ckpt, tmp_path / "voices", auth_token="s3cret-token")
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.TextToSpeechStub(ch)
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            calls: list[Callable[[list[tuple[str, str]]], object]] = [
                lambda md: stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=md),
                lambda md: stub.ListVoices(pb.ListVoicesRequest(), metadata=md),
                lambda md: collect(stub.StreamSynthesize(iter([pb.StreamRequest(text="x")]), metadata=md)),
                lambda md: list(
                    refl.ServerReflectionInfo(
                        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=md
                    )
                ),
            ]
            for call in calls:
                for md in ([], [("authorization", "Bearer wrong")], [("authorization", "s3cret-token")]):
                    err = rpc_error(lambda call=call, md=md: call(md))  # type: ignore[misc]
                    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()
                    assert "Bearer" in err.details()
            good = [("authorization", "Bearer s3cret-token")]
            assert stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=good).model_kind == "base"
            err = rpc_error(
                lambda: collect(stub.StreamSynthesize(iter([pb.StreamRequest(text="x")]), metadata=good))
            )
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT  # past auth: the protocol rule
            assert health_status(ch) == SERVING  # health checks need no token
    finally:
        srv.stop()


def test_no_auth_when_no_token(ckpt: Checkpoint, tmp_path: Path) -> None:
    srv = start_server(ckpt, tmp_path / "voices", warmup=False)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            assert pb_grpc.TextToSpeechStub(ch).GetServerInfo(pb.GetServerInfoRequest()).model_kind == "base"
    finally:
        srv.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls(ckpt: Checkpoint, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    srv = start_server(ckpt, tmp_path / "voices", tls_cert=cert, tls_key=key, warmup=False)
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(srv.address, creds) as ch:
            assert (
                pb_grpc.TextToSpeechStub(ch).GetServerInfo(pb.GetServerInfoRequest(), timeout=10).model_kind
                == "base"
            )
        with grpc.insecure_channel(srv.address) as ch:  # plaintext is refused
            err = rpc_error(
                lambda: pb_grpc.TextToSpeechStub(ch).GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
            )
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        srv.stop()


# --------------------------------------------------------------------------- the commands, in processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qwen3tts_rt.cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env,
    )  # fmt: skip


@pytest.fixture
def served(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwen3tts_rt.cli", "serve", "--model", str(tiny_checkpoint("base", 0)),
         "--port", str(port), "--metrics-port", "-1", "--voices-dir", str(tmp_path / "voices"),
         "--torch-threads", "1", "--grace", "30"],
        stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )  # fmt: skip
    addr = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(addr) as ch:

            def serving() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"the server exited:\n{(tmp_path / 'serve.log').read_text()}")
                try:
                    return health_status(ch) == SERVING
                except grpc.RpcError:
                    return False

            assert wait_for(serving, timeout=90, interval=0.2), (tmp_path / "serve.log").read_text()
        yield proc, addr
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        log.close()


def test_cli_voice_say_and_sigterm_drain(
    served: tuple[subprocess.Popen[str], str], tmp_path: Path, speech_wav: Callable[..., bytes]
) -> None:
    proc, addr = served
    ref = tmp_path / "ref.wav"
    ref.write_bytes(speech_wav(1.5))
    made = _cli(
        "voice", "create", "--addr", addr, "--ref-audio", str(ref), "--x-vector-only", "--name", "cli"
    )
    assert made.returncode == 0, made.stderr
    vid = made.stdout.strip()
    listed = _cli("voice", "list", "--addr", addr)
    assert vid in listed.stdout and "cli" in listed.stdout

    out = tmp_path / "say.wav"
    said = _cli(
        "say", "--addr", addr, f"--voice={vid}", "--text", "Hello from the command line.",  # ids may start with "-"
        "--tokens-per-second", "50", "--sample-rate", "16000", "--greedy", "--max-new-tokens", "10", "--out", str(out),
    )  # fmt: skip
    assert said.returncode == 0, said.stderr
    assert "first-packet latency" in said.stdout and "RTF" in said.stdout
    wav, rate = read_wav(out)
    assert rate == 16000 and len(wav) == 9 * 1280 and np.abs(wav).max() > 0

    bad = _cli(
        "say", "--addr", addr, "--voice", "nope-nope-nope", "--text", "x", "--out", str(tmp_path / "x.wav")
    )
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "config.voice_id" in bad.stderr

    # SIGTERM while a stream is in flight: it finishes, new calls are refused, the process exits 0
    with grpc.insecure_channel(addr) as ch:
        stub = pb_grpc.TextToSpeechStub(ch)
        call = BidiCall(stub).send(config=greedy(vid, frames=40)).text("Let me finish.").close()
        responses = iter(call)
        next(responses)
        proc.send_signal(signal.SIGTERM)
        rest = collect(responses)
        assert rest.dones and rest.dones[-1].frames == 39
    assert proc.wait(30) == 0
    deleted = _cli("voice", "delete", "--addr", addr, "--", vid, timeout=30)
    assert deleted.returncode == 1 and "UNAVAILABLE" in deleted.stderr


def test_serve_without_weights_says_what_to_do(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = _cli(
        "serve", "--model", "Qwen/Qwen3-TTS-12Hz-0.6B-Base", "--port", "0", "--metrics-port", "-1",
        "--voices-dir", str(tmp_path / "v"), env=env,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "not in the local hub cache" in proc.stderr and "make-checkpoint" in proc.stderr
