"""Named utterances over gRPC (tiny CustomVoice checkpoint): keys echoed on every message,
per-utterance voices and layouts equal to single-voice streams, cancel by key, progress
with its sample offset, bounded keys, the idle and duration limits, and a stored-voice
stream that does not wait behind clonings."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from qwen3tts_rt.model.checkpoint import Checkpoint
from qwen3tts_rt.server.app import ServerThread
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc
from tests.reliability import record
from tests.server_helpers import BidiCall, collect, start_server, wait_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FRAMES = 16
GREEDY = pb.SamplingParams(greedy=True, max_new_tokens=FRAMES)


@pytest.fixture(scope="module")
def ckpt(tiny_loaded: Callable[..., Checkpoint]) -> Checkpoint:
    return tiny_loaded("custom_voice", 0)


@pytest.fixture(scope="module")
def server(ckpt: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    # bit-exact comparisons with one-frame decodes: fixed packets (adaptive: test_server_packets.py)
    srv = start_server(
        ckpt, tmp_path_factory.mktemp("voices"), max_sessions=3, warmup=False, packet_policy="fixed"
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.TextToSpeechStub]:
    with grpc.insecure_channel(server.address) as ch:
        yield pb_grpc.TextToSpeechStub(ch)


def config(ckpt: Checkpoint, speaker: int = 0, **kw: object) -> pb.StreamConfig:
    return pb.StreamConfig(
        speaker=ckpt.config.speakers[speaker],
        language="english",
        sampling=GREEDY,
        **kw,  # type: ignore[arg-type]
    )


def alone(stub: pb_grpc.TextToSpeechStub, cfg: pb.StreamConfig, text: str) -> bytes:
    """The audio of one utterance spoken by a stream of its own."""
    call = BidiCall(stub).send(config=cfg).text(text).close()
    got = collect(call)
    return bytes(got.audio[0])


def test_keys_and_per_utterance_voices_and_layouts(ckpt: Checkpoint, stub: pb_grpc.TextToSpeechStub) -> None:
    other = ckpt.config.speakers[1]
    call = BidiCall(stub).send(config=config(ckpt))
    call.send(begin=pb.BeginUtterance(key="reply-1")).text("Hello ", "there.")
    call.send(begin=pb.BeginUtterance(key="reply-2", options=pb.UtteranceOptions(speaker=other)))
    call.text("How are ", "you?")
    whole = pb.UtteranceOptions(non_streaming_mode=True)
    call.send(begin=pb.BeginUtterance(key="reply-3", options=whole)).text("Fine, ", "thanks.").close()
    got = collect(call)
    assert [(d.utterance_id, d.key) for d in got.dones] == [(0, "reply-1"), (1, "reply-2"), (2, "reply-3")]
    assert {c.key for c in got.chunks if c.utterance_id == 1} == {"reply-2"}
    assert all(p.key == ("reply-1", "reply-2", "reply-3")[p.utterance_id] for p in got.progress)
    # each utterance equals a stream of its own with that voice and layout
    assert bytes(got.audio[0]) == alone(stub, config(ckpt), "Hello there.")
    assert bytes(got.audio[1]) == alone(stub, config(ckpt, 1), "How are you?")
    assert bytes(got.audio[2]) == alone(stub, config(ckpt, non_streaming_mode=True), "Fine, thanks.")


def test_progress_says_what_was_read_and_when(ckpt: Checkpoint, stub: pb_grpc.TextToSpeechStub) -> None:
    text = "One two three four five six."
    call = BidiCall(stub).send(config=config(ckpt)).text(*[w + " " for w in text.split()]).close()
    got = collect(call)
    assert got.progress, "no progress"
    chars = [p.chars_consumed for p in got.progress]
    offsets = [p.sample_offset for p in got.progress]
    assert chars == sorted(chars) and chars[-1] <= len(text) + 1
    assert offsets == sorted(offsets) and offsets[0] > 0
    assert offsets[-1] <= len(np.frombuffer(bytes(got.audio[0]), dtype="<i2"))


def test_cancel_by_key_leaves_the_other_utterances_unchanged(
    ckpt: Checkpoint, stub: pb_grpc.TextToSpeechStub
) -> None:
    first, last = "Keep this one.", "And this one too."
    call = BidiCall(stub).send(config=config(ckpt))
    call.send(begin=pb.BeginUtterance(key="a")).text(first)
    call.send(begin=pb.BeginUtterance(key="b")).text("Drop this sentence please.")
    call.send(begin=pb.BeginUtterance(key="c")).text(last).flush()
    call.send(cancel=pb.Cancel(key="b")).close()
    got = collect(call)
    assert [(d.key, d.reason == pb.UtteranceDone.CANCELLED) for d in got.dones] == [
        ("a", False),
        ("b", True),
        ("c", False),
    ]
    assert bytes(got.audio[0]) == alone(stub, config(ckpt), first)
    assert bytes(got.audio[2]) == alone(stub, config(ckpt), last)


@pytest.mark.parametrize(
    "request_",
    [
        pb.StreamRequest(begin=pb.BeginUtterance(key="k" * 129)),
        pb.StreamRequest(begin=pb.BeginUtterance(key="no spaces")),
        pb.StreamRequest(flush=pb.Flush(client_id="x" * 1_000_000)),
        pb.StreamRequest(cancel=pb.Cancel(key="k" * 200)),
        pb.StreamRequest(begin=pb.BeginUtterance(key="a", options=pb.UtteranceOptions(speaker="nobody"))),
        pb.StreamRequest(begin=pb.BeginUtterance(key="a", options=pb.UtteranceOptions(language="klingon"))),
    ],
    ids=["long-key", "bad-key", "huge-client-id", "long-cancel-key", "unknown-speaker", "unknown-language"],
)
def test_bad_utterance_requests_are_refused_clearly(
    ckpt: Checkpoint, stub: pb_grpc.TextToSpeechStub, server: ServerThread, request_: pb.StreamRequest
) -> None:
    call = BidiCall(stub).send(config=config(ckpt))
    call._q.put(request_)
    call.close()
    with pytest.raises(grpc.RpcError) as e:
        collect(call)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(e.value.details()) < 400
    assert any(w in e.value.details() for w in ("begin.", "flush.", "cancel."))
    engine = server.server.runtime.engine  # type: ignore[union-attr]
    assert wait_for(lambda: engine.live_sessions == 0, 10)


def test_silent_streams_and_old_streams_end_with_deadline_exceeded(ckpt: Checkpoint, tmp_path: Path) -> None:
    """Every session held by a stream that sends its config and then nothing: each ends with
    DEADLINE_EXCEEDED naming the setting, the sessions come back, and the next stream is
    served."""
    srv = start_server(
        ckpt,
        tmp_path / "voices",
        max_sessions=2,
        warmup=False,
        stream_idle_timeout_s=0.5,
        max_stream_duration_s=30,
    )
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.TextToSpeechStub(ch)
            silent = [BidiCall(stub).send(config=config(ckpt)) for _ in range(2)]  # then nothing
            codes, details = [], []
            for call in silent:
                with pytest.raises(grpc.RpcError) as e:
                    collect(call)
                codes.append(e.value.code())
                details.append(e.value.details())
            assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2, codes
            assert all("stream_idle_timeout_s" in d for d in details), details
            engine = srv.server.runtime.engine  # type: ignore[union-attr]
            assert wait_for(lambda: engine.live_sessions == 0, 10)
            # a stream that keeps speaking is not idle
            call = BidiCall(stub).send(config=config(ckpt)).text("Still talking here.").close()
            assert collect(call).dones
    finally:
        srv.stop()
    record(
        "idle holds",
        "2 streams send a config, then nothing (max_sessions=2, stream_idle_timeout_s=0.5)",
        code=codes[0].name,
        message=details[0],
        sessions_after=0,
        next_stream="served",
    )
    srv = start_server(ckpt, tmp_path / "voices2", max_sessions=2, warmup=False, max_stream_duration_s=0.5)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.TextToSpeechStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                collect(BidiCall(stub).send(config=config(ckpt)))
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "max_stream_duration_s" in e.value.details()
            engine = srv.server.runtime.engine  # type: ignore[union-attr]
            assert wait_for(lambda: engine.live_sessions == 0, 10)
    finally:
        srv.stop()
    record(
        "idle holds",
        "a stream older than max_stream_duration_s=0.5",
        code=e.value.code().name,
        message=e.value.details(),
        sessions_after=0,
    )


def test_a_stored_voice_stream_does_not_wait_behind_clonings(
    tiny_loaded: Callable[..., Checkpoint],
    speech_wav: Callable[..., bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ten 60 s clonings held behind a gate (in the reference-audio decoding stage); a
    stream with a stored voice gets its first packet before any of them finishes."""
    import qwen3tts_rt.server.runtime as runtime_mod

    base = tiny_loaded("base", 0)
    srv = start_server(base, tmp_path / "voices", max_sessions=2, warmup=False, max_voice_jobs=16)
    gate = threading.Event()
    real_load = runtime_mod.load_reference_audio
    order: list[str] = []
    lock = threading.Lock()

    def gated_load(*a: object, **kw: object) -> object:
        if not gate.is_set():
            gate.wait(120)
        return real_load(*a, **kw)  # type: ignore[arg-type]

    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.TextToSpeechStub(ch)
            voice = stub.CreateVoice(
                pb.CreateVoiceRequest(ref_audio=speech_wav(1.5), x_vector_only=True, display_name="v")
            ).voice_id
            monkeypatch.setattr(runtime_mod, "load_reference_audio", gated_load)
            long_audio = [speech_wav(60.0, seed=k) for k in range(10)]

            def clone(k: int) -> None:
                stub.CreateVoice(
                    pb.CreateVoiceRequest(ref_audio=long_audio[k], x_vector_only=True, display_name=f"c{k}"),
                    timeout=300,
                )
                with lock:
                    order.append(f"clone-{k}")

            threads = [threading.Thread(target=clone, args=(k,)) for k in range(10)]
            for t in threads:
                t.start()
            cfg = pb.StreamConfig(voice_id=voice, language="english", sampling=GREEDY)
            call = BidiCall(stub).send(config=cfg).text("Hello there.").close()
            for r in call:
                if r.WhichOneof("response") == "audio" and not gate.is_set():
                    with lock:
                        order.append("first-packet")
                    gate.set()  # only now may the clonings go on
            for t in threads:
                t.join(300)
    finally:
        gate.set()
        srv.stop()
    assert order[0] == "first-packet", order
    assert sorted(order[1:]) == sorted(f"clone-{k}" for k in range(10))
    record(
        "denial of service",
        "a stored-voice stream while ten 60 s clonings are held in reference decoding",
        first_packet_before_clonings_end="yes",
        clonings_completed=len(order) - 1,
    )
