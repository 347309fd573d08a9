"""Server-wide limits that keep every queue bounded: voice clonings queued behind the one
voice thread, and RPCs in flight. Each is a named setting; going past it is
RESOURCE_EXHAUSTED naming the setting, and the server serves on."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from qwen3tts_rt.model.checkpoint import Checkpoint
from qwen3tts_rt.server.app import ServerThread
from qwen3tts_rt.server.config import ServerConfig
from qwen3tts_rt.server.runtime import Runtime
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc
from tests.reliability import record
from tests.server_helpers import start_server, wait_for


@pytest.fixture(scope="module")
def ckpt(tiny_loaded: Callable[..., Checkpoint]) -> Checkpoint:
    return tiny_loaded("base")


@pytest.fixture
def held_clone(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Cloning blocks (off the event loop) until ``release`` is set; ``started`` is set when
    the first cloning has begun."""
    started, release = threading.Event(), threading.Event()
    real = Runtime._clone

    async def held(self: Runtime, *a: Any, **kw: Any) -> Any:
        started.set()
        await asyncio.to_thread(release.wait, 60)
        return await real(self, *a, **kw)

    monkeypatch.setattr(Runtime, "_clone", held)
    yield started, release
    release.set()


def test_voice_clonings_beyond_the_queue_limit_are_refused(
    ckpt: Checkpoint, tmp_path: Path, speech_wav: Callable[..., bytes], held_clone: Any
) -> None:
    started, release = held_clone
    srv = start_server(ckpt, tmp_path / "voices", max_voice_jobs=2, warmup=False)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.TextToSpeechStub(ch)
            futures = [
                stub.CreateVoice.future(
                    pb.CreateVoiceRequest(ref_audio=speech_wav(seed=i), x_vector_only=True), timeout=60
                )
                for i in range(2)
            ]
            assert started.wait(30)
            assert wait_for(lambda: srv.server.runtime._voice_jobs == 2, 10)
            with pytest.raises(grpc.RpcError) as exc:
                stub.CreateVoice(pb.CreateVoiceRequest(ref_audio=speech_wav(seed=9), x_vector_only=True))
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_voice_jobs" in exc.value.details()
            release.set()
            ids = {f.result().voice_id for f in futures}
            assert len(ids) == 2
            assert srv.server.runtime._voice_jobs == 0
            # served on: a new cloning is admitted once the queue has room
            stub.CreateVoice(pb.CreateVoiceRequest(ref_audio=speech_wav(seed=9), x_vector_only=True))
        record(
            "load",
            "voice clonings beyond max_voice_jobs",
            limit=2,
            third="RESOURCE_EXHAUSTED: " + exc.value.details(),
            after_release="admitted",
        )
    finally:
        srv.stop()


def test_rpcs_beyond_max_concurrent_rpcs_are_refused(
    ckpt: Checkpoint, tmp_path: Path, speech_wav: Callable[..., bytes], held_clone: Any
) -> None:
    started, release = held_clone
    srv = start_server(ckpt, tmp_path / "voices", max_concurrent_rpcs=2, max_voice_jobs=8, warmup=False)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.TextToSpeechStub(ch)
            held = [
                stub.CreateVoice.future(
                    pb.CreateVoiceRequest(ref_audio=speech_wav(seed=i), x_vector_only=True), timeout=60
                )
                for i in range(2)
            ]
            assert started.wait(30)
            assert wait_for(lambda: srv.server.inflight.count == 2, 10)
            with pytest.raises(grpc.RpcError) as exc:
                stub.ListVoices(pb.ListVoicesRequest(), timeout=10)
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            release.set()
            for f in held:
                f.result()
            assert wait_for(lambda: srv.server.inflight.count == 0, 10)
            assert len(stub.ListVoices(pb.ListVoicesRequest(), timeout=10).voices) == 2
        record(
            "load",
            "RPCs beyond max_concurrent_rpcs",
            limit=2,
            third=f"{exc.value.code().name}: {exc.value.details()}",
        )
    finally:
        srv.stop()


def test_limits_have_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen3tts_rt import cli
    from qwen3tts_rt.server import app

    seen: list[ServerConfig] = []

    async def fake_serve(config: ServerConfig) -> None:
        seen.append(config)

    monkeypatch.setattr(app, "serve", fake_serve)
    flags = {
        "max_buffered_packets": 7,
        "max_pending_utterances": 3,
        "max_voice_jobs": 5,
        "max_concurrent_rpcs": 99,
        "max_instruct_chars": 11,
        "max_synthesize_chars": 12,
    }
    argv = ["serve", "--model", "m", "--device", "cpu", "--dtype", "float32"]
    for name, value in flags.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    cli.cmd_serve(cli.build_parser().parse_args(argv))
    engine_fields = {f.name for f in dataclasses.fields(seen[-1].engine)}
    got = {n: getattr(seen[-1].engine if n in engine_fields else seen[-1], n) for n in flags}
    assert got == flags
    with pytest.raises(SystemExit, match="max_voice_jobs"):
        cli.cmd_serve(cli.build_parser().parse_args([*argv, "--max-voice-jobs", "0"]))


def test_limits_reach_the_engine(ckpt: Checkpoint, tmp_path: Path) -> None:
    srv: ServerThread = start_server(
        ckpt, tmp_path / "voices", max_buffered_packets=7, max_pending_utterances=3, warmup=False
    )
    try:
        cfg = srv.server.runtime.require_engine().config
        assert (cfg.max_buffered_packets, cfg.max_pending_utterances) == (7, 3)
    finally:
        srv.stop()
