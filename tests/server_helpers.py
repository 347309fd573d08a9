"""Helpers shared by the server tests: servers on free loopback ports, bidi calls driven
from the test, metrics scraping."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc
import queue
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from prometheus_client.parser import text_string_to_metric_families

from qwen3tts_rt.audio import encode_pcm
from qwen3tts_rt.engine.engine import EngineConfig
from qwen3tts_rt.model.checkpoint import Checkpoint
from qwen3tts_rt.server.app import ServerThread
from qwen3tts_rt.server.config import ServerConfig
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc


def start_server(
    ckpt: Checkpoint | None, voices_dir: Path, *, load: bool = True, **overrides: Any
) -> ServerThread:
    """A server on a free loopback port; ``overrides`` are ServerConfig fields or
    EngineConfig fields (``max_sessions=2``)."""
    engine_names = {f.name for f in dataclasses.fields(EngineConfig)}
    engine = {k: overrides.pop(k) for k in list(overrides) if k in engine_names}
    cfg = ServerConfig(
        model=str(ckpt.path) if ckpt is not None else overrides.pop("model"),
        port=0,
        metrics_port=0,
        voices_dir=voices_dir,
        drain_grace_s=5.0,
        engine=EngineConfig(**engine),
        **overrides,
    )
    return ServerThread(cfg, ckpt).start(load=load)


def greedy(voice_id: str, frames: int, **kw: object) -> pb.StreamConfig:
    """A stream config for a stored voice: English, greedy, ``frames`` new tokens at most."""
    return pb.StreamConfig(
        voice_id=voice_id,
        language="english",
        sampling=pb.SamplingParams(greedy=True, max_new_tokens=frames),
        **kw,  # type: ignore[arg-type]
    )


_MALLOC_TRIM = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)  # glibc only


def rss_mb() -> float:
    """This process's resident memory in MiB, after a garbage collection and (glibc) after
    ``malloc_trim`` hands freed heap pages back: growth then counts memory in use, not pages the
    allocator's per-thread arenas keep (those swung by 100-200 MB between rounds of 200 threads)."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
    return psutil.Process().memory_info().rss / 2**20


def int16(wav: np.ndarray) -> np.ndarray:
    """Float samples quantised exactly as the server's PCM_S16LE encoding does."""
    return np.frombuffer(encode_pcm(wav, "PCM_S16LE"), dtype="<i2")


def assert_pcm_close(got: np.ndarray, want: np.ndarray) -> None:
    """16-bit audio equal to within 1 LSB: packets of several frames are decoded in one
    call, whose float rounding differs from the one-frame decode of the reference by
    ~1e-6, enough to move a sample across a rounding boundary now and then."""
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got.astype(np.int32), want.astype(np.int32), atol=1, rtol=0)


class BidiCall:
    """A StreamSynthesize call whose requests the test sends one by one."""

    _END = object()

    def __init__(
        self, stub: pb_grpc.TextToSpeechStub, *, metadata: Any = None, timeout: float | None = 120
    ) -> None:
        self._q: queue.Queue[Any] = queue.Queue()
        self.call = stub.StreamSynthesize(self._requests(), metadata=metadata, timeout=timeout)

    def _requests(self) -> Iterator[pb.StreamRequest]:
        while True:
            item = self._q.get()
            if item is self._END:
                return
            yield item

    def send(self, **kw: Any) -> BidiCall:
        self._q.put(pb.StreamRequest(**kw))
        return self

    def text(self, *deltas: str) -> BidiCall:
        for d in deltas:
            self.send(text=d)
        return self

    def flush(self, client_id: str = "") -> BidiCall:
        return self.send(flush=pb.Flush(client_id=client_id))

    def close(self) -> BidiCall:
        self._q.put(self._END)
        return self

    def __iter__(self) -> Iterator[pb.StreamResponse]:
        return iter(self.call)

    def cancel(self) -> None:
        self.call.cancel()


@dataclass
class Collected:
    audio: dict[int, bytearray] = field(default_factory=dict)
    dones: list[pb.UtteranceDone] = field(default_factory=list)
    progress: list[pb.Progress] = field(default_factory=list)
    chunks: list[pb.AudioChunk] = field(default_factory=list)

    def pcm(self, utterance_id: int) -> np.ndarray:
        return np.frombuffer(bytes(self.audio.get(utterance_id, b"")), dtype="<i2")


def collect(responses: Any, on_response: Callable[[pb.StreamResponse], None] | None = None) -> Collected:
    out = Collected()
    for r in responses:
        kind = r.WhichOneof("response")
        if kind == "audio":
            out.audio.setdefault(r.audio.utterance_id, bytearray()).extend(r.audio.audio)
            out.chunks.append(r.audio)
        elif kind == "utterance_done":
            out.dones.append(r.utterance_done)
        elif kind == "progress":
            out.progress.append(r.progress)
        if on_response is not None:
            on_response(r)
    return out


def scrape(port: int) -> dict[str, Any]:
    """/metrics as {family name: family} (prometheus-client's parser)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(families: dict[str, Any], family: str, name: str, **labels: str) -> float:
    total = 0.0
    for s in families[family].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            total += s.value
    return total


def wait_for(pred: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def rpc_error(fn: Callable[[], Any]) -> grpc.RpcError:
    """Run ``fn``; return the RpcError it raised (fails if none)."""
    try:
        fn()
    except grpc.RpcError as e:
        return e
    raise AssertionError("expected an RpcError")


def drain_in_background(srv: ServerThread, grace_s: float) -> threading.Thread:
    t = threading.Thread(target=srv.stop, args=(grace_s,), daemon=True)
    t.start()
    return t
