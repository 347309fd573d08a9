"""The Riva-compatible service with the stock ``nvidia-riva-client`` package: its
talk-style command line (``--stream``, ``--list-voices``) against a live server, and
the library calls directly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import riva.client
from riva.client.proto import riva_tts_pb2

from qwen3tts_rt.audio import resample
from qwen3tts_rt.engine.synth import synthesize
from qwen3tts_rt.engine.voices import create_voice_clone_prompt, voice_prompt
from qwen3tts_rt.model.checkpoint import Checkpoint
from qwen3tts_rt.server.app import ServerThread
from qwen3tts_rt.server.riva_service import TextJoiner, piece_separator
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc
from tests.server_helpers import int16, rpc_error, start_server

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TALK = os.environ.get("RIVA_TALK_PY") or str(Path(__file__).with_name("riva_talk.py"))
TEXT = "Hello world."


@pytest.fixture(scope="module")
def ckpt(tiny_loaded: Callable[..., Checkpoint]) -> Checkpoint:
    # Riva clients cannot ask for greedy decoding: the checkpoint's defaults are greedy.
    return tiny_loaded("base", 0, greedy_defaults=True)


@pytest.fixture(scope="module")
def server(ckpt: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    # bit-exact comparisons with one-frame decodes: fixed packets (adaptive: test_server_packets.py)
    srv = start_server(ckpt, tmp_path_factory.mktemp("voices"), packet_policy="fixed")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def ref_wav(speech_wav: Callable[..., bytes]) -> bytes:
    return speech_wav(1.5, seed=3)


@pytest.fixture(scope="module")
def voice_id(server: ServerThread, ref_wav: bytes) -> str:
    with grpc.insecure_channel(server.address) as ch:
        req = pb.CreateVoiceRequest(ref_audio=ref_wav, x_vector_only=True, display_name="riva")
        return pb_grpc.TextToSpeechStub(ch).CreateVoice(req).voice_id


@pytest.fixture(scope="module")
def reference(ckpt: Checkpoint, ref_wav: bytes) -> np.ndarray:
    """24 kHz float audio the server must produce for TEXT with the stored voice."""
    clone = create_voice_clone_prompt(ckpt, ref_wav, x_vector_only=True, allow_paths=False)
    return synthesize(ckpt, voice_prompt(ckpt, clone=clone), TEXT, "english").wav


def talk(server: ServerThread, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, TALK, "--server", server.address, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2"), w.getframerate()


@pytest.mark.parametrize("rate", [16000, 32000, 44100])
def test_talk_stream_writes_a_correct_wav(
    server: ServerThread, voice_id: str, reference: np.ndarray, tmp_path: Path, rate: int
) -> None:
    out = tmp_path / f"talk-{rate}.wav"
    proc = talk(
        server, "--stream", "--text", TEXT, "--voice", f"Qwen3-TTS.{voice_id}",
        "--language-code", "en-US", "--sample-rate-hz", str(rate), "-o", str(out),
    )  # fmt: skip
    assert "Time to first audio" in proc.stdout
    pcm, got_rate = read_wav(out)
    assert got_rate == rate
    np.testing.assert_array_equal(pcm, int16(resample(reference, 24000, rate)))


def test_talk_without_a_voice_uses_the_first_stored_one(
    server: ServerThread, voice_id: str, reference: np.ndarray, tmp_path: Path
) -> None:
    out = tmp_path / "default.wav"
    talk(server, "--stream", "--text", TEXT, "--sample-rate-hz", "24000", "-o", str(out))
    pcm, _ = read_wav(out)
    np.testing.assert_array_equal(pcm, int16(reference))


def test_talk_zero_shot_prompt_file(
    server: ServerThread, ref_wav: bytes, reference: np.ndarray, tmp_path: Path
) -> None:
    prompt = tmp_path / "prompt.wav"
    prompt.write_bytes(ref_wav)
    out = tmp_path / "zero-shot.wav"
    talk(
        server,
        "--stream",
        "--text",
        TEXT,
        "--audio_prompt_file",
        str(prompt),
        "--sample-rate-hz",
        "24000",
        "-o",
        str(out),
    )
    pcm, _ = read_wav(out)
    np.testing.assert_array_equal(pcm, int16(reference))  # no transcript: x-vector clone


def test_talk_list_voices(server: ServerThread, voice_id: str) -> None:
    listed = json.loads(talk(server, "--list-voices").stdout)
    assert f"Qwen3-TTS.{voice_id}" in listed["en-US"]["voices"]
    assert {"zh-CN", "de-DE", "ja-JP"} <= set(listed)


def test_unary_synthesize_with_the_library(
    server: ServerThread, voice_id: str, reference: np.ndarray
) -> None:
    service = riva.client.SpeechSynthesisService(riva.client.Auth(uri=server.address))
    resp = service.synthesize(TEXT, f"Qwen3-TTS.{voice_id}", "en-US", sample_rate_hz=22050)
    np.testing.assert_array_equal(np.frombuffer(resp.audio, "<i2"), int16(resample(reference, 24000, 22050)))
    # old one-request streaming clients: one request, then the stream of audio
    chunks = list(service.synthesize_online(TEXT, voice_id, "english", sample_rate_hz=24000))
    assert len(chunks) > 5
    np.testing.assert_array_equal(np.frombuffer(b"".join(c.audio for c in chunks), "<i2"), int16(reference))


def test_riva_errors(server: ServerThread, voice_id: str) -> None:
    service = riva.client.SpeechSynthesisService(riva.client.Auth(uri=server.address))
    cases = [
        (lambda: service.synthesize(TEXT, voice_id, "xx-XX"), "language_code"),
        (lambda: service.synthesize(TEXT, "Qwen3-TTS.nobody", "en-US"), "voice_name"),
        (lambda: service.synthesize(TEXT, voice_id, "en-US", sample_rate_hz=12345), "sample_rate_hz"),
        (
            lambda: service.synthesize(TEXT, voice_id, "en-US", encoding=riva.client.AudioEncoding.OGGOPUS),
            "encoding",
        ),
        (lambda: service.synthesize("", voice_id, "en-US"), "text"),
        (
            lambda: list(service.synthesize_online(TEXT, voice_id, "fr-CA", sample_rate_hz=8001)),
            "sample_rate_hz",
        ),
    ]
    for fn, field in cases:
        err = rpc_error(fn)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert err.details().startswith(f"{field}:"), err.details()


def test_riva_config_filter(server: ServerThread) -> None:
    with grpc.insecure_channel(server.address) as ch:
        from riva.client.proto import riva_tts_pb2_grpc

        stub = riva_tts_pb2_grpc.RivaSpeechSynthesisStub(ch)
        resp = stub.GetRivaSynthesisConfig(riva_tts_pb2.RivaSynthesisConfigRequest(model_name="other"))
        assert len(resp.model_config) == 0


# ---------------------------------------------------------------------- multi-text requests

# An LLM reply as Pipecat's NvidiaTTSService (stitched mode) sends it: one SynthesizeOnline
# stream, one request per sentence, each sentence stripped and cut at 200 characters on
# whitespace (the whitespace dropped).
REPLY = [
    "Sure, I can help with that.",
    "The weather today is sunny with a light breeze from the west, and the temperature should "
    "reach twenty-two degrees by the afternoon, so it is a good day for a walk along the river "
    "or a picnic in the park with friends and family.",
    "Anything else?",
]


def stitched_requests(sentences: list[str]) -> list[str]:
    """The request texts of Pipecat's stitched mode, made by Pipecat's own splitter."""
    try:
        from pipecat.services.nvidia.tts import NvidiaTTSService

        split = NvidiaTTSService._split_text_into_chunks
    except ImportError:  # without the [pipecat] extra: the same rule (textwrap at 200)
        import textwrap

        def split(text: str) -> list[str]:
            return textwrap.wrap(text.strip(), width=200, break_long_words=True, break_on_hyphens=False)

    return [chunk for s in sentences for chunk in split(s.strip())]


def test_piece_separator_rules() -> None:
    assert piece_separator("", "Hello") == ""
    assert piece_separator("with that.", "The weather") == " "
    assert piece_separator("with that. ", "The weather") == ""
    assert piece_separator("with that.", " The weather") == ""
    assert piece_separator("line\n", "next") == ""
    assert piece_separator("你好。", "今天天气很好。") == ""  # CJK: no space between sentences
    assert piece_separator("こんにちは。", "元気ですか") == ""
    assert piece_separator("你好。", "Hello") == " "  # a script change keeps its space
    assert piece_separator("Hello.", "你好") == " "
    assert piece_separator("안녕하세요.", "반갑습니다.") == " "  # Korean puts spaces between words
    joiner = TextJoiner()
    assert [joiner.piece(t) for t in ["a.", "", "b", " c", "d"]] == ["a.", "", " b", " c", " d"]
    assert joiner.chars == len("a. b c d")
    raw = TextJoiner(raw=True)
    assert "".join(raw.piece(t) for t in ["with that.", "The"]) == "with that.The"


def _online_pcm(
    service: riva.client.SpeechSynthesisService, text: str | list[str], voice_id: str, **custom: str
) -> np.ndarray:
    chunks = service.synthesize_online(
        text, voice_id, "en-US", sample_rate_hz=24000, custom_configuration={"seed": "7", **custom}
    )
    return np.frombuffer(b"".join(c.audio for c in chunks), "<i2")


def test_stitched_mode_is_spoken_as_the_whole_text(server: ServerThread, voice_id: str) -> None:
    """Each request of a multi-text stream is one text: the stitched request pattern gives
    the same audio as the whole reply in one request (same seed), and a long sentence cut
    at 200 characters keeps its word boundary."""
    requests = stitched_requests(REPLY)
    assert len(requests) > len(REPLY)  # the long sentence was cut
    assert not any(r != r.strip() for r in requests)  # and every piece stripped
    service = riva.client.SpeechSynthesisService(riva.client.Auth(uri=server.address))
    whole = _online_pcm(service, " ".join(REPLY), voice_id)
    stitched = _online_pcm(service, requests, voice_id)
    assert whole.size > 0
    np.testing.assert_array_equal(stitched, whole)
    # the unary call with the same layout (a clone's official default: dual-track) agrees
    resp = service.synthesize(
        " ".join(REPLY), voice_id, "en-US", sample_rate_hz=24000, custom_configuration={"seed": "7"}
    )
    np.testing.assert_array_equal(np.frombuffer(resp.audio, "<i2"), whole)


def test_raw_deltas_opt_in_concatenates(server: ServerThread, voice_id: str) -> None:
    service = riva.client.SpeechSynthesisService(riva.client.Auth(uri=server.address))
    deltas = ["Hel", "lo wor", "ld."]
    raw = _online_pcm(service, deltas, voice_id, raw_deltas="true")
    np.testing.assert_array_equal(raw, _online_pcm(service, "Hello world.", voice_id))
    joined = _online_pcm(service, deltas, voice_id)  # without the opt-in: three texts
    np.testing.assert_array_equal(joined, _online_pcm(service, "Hel lo wor ld.", voice_id))


def test_cjk_texts_join_without_spaces(server: ServerThread, voice_id: str) -> None:
    service = riva.client.SpeechSynthesisService(riva.client.Auth(uri=server.address))
    np.testing.assert_array_equal(
        _online_pcm(service, ["你好。", "今天天气很好。"], voice_id),
        _online_pcm(service, "你好。今天天气很好。", voice_id),
    )


def test_unary_non_streaming_mode_override(
    server: ServerThread, ckpt: Checkpoint, ref_wav: bytes, voice_id: str
) -> None:
    service = riva.client.SpeechSynthesisService(riva.client.Auth(uri=server.address))
    clone = create_voice_clone_prompt(ckpt, ref_wav, x_vector_only=True, allow_paths=False)
    whole_text = synthesize(
        ckpt, voice_prompt(ckpt, clone=clone), TEXT, "english", non_streaming_mode=True
    ).wav
    resp = service.synthesize(
        TEXT, voice_id, "en-US", sample_rate_hz=24000, custom_configuration={"non_streaming_mode": "true"}
    )
    np.testing.assert_array_equal(np.frombuffer(resp.audio, "<i2"), int16(whole_text))
    err = rpc_error(
        lambda: service.synthesize(
            TEXT, voice_id, "en-US", custom_configuration={"non_streaming_mode": "maybe"}
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("custom_configuration.non_streaming_mode:"), err.details()
