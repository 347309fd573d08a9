"""The Redis voice store against a real ``redis-server`` (Debian package) started by the
test on a free loopback port: the directory store's guarantees (atomic create,
unguessable ids, list, delete, limits, survives a restart), several servers writing at
once, Redis at its memory limit, Redis gone, Redis restarted with AOF, and two real gRPC
servers sharing one store."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from qwen3tts_rt.engine.voices import VoiceClonePrompt
from qwen3tts_rt.errors import CapacityError, NotFoundError, UnavailableError
from qwen3tts_rt.model.checkpoint import Checkpoint
from qwen3tts_rt.server.config import ServerConfig
from qwen3tts_rt.server.voice_store import (
    DirectoryVoiceStore,
    StoreFullError,
    VoiceStore,
    is_valid_voice_id,
    open_voice_store,
)

redis = pytest.importorskip("redis", reason="the redis client is missing: pip install -e '.[ray]'")

from qwen3tts_rt.server.voice_store_redis import RedisVoiceStore, redacted  # noqa: E402

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not installed (make system-deps installs Debian's)"
)
START_TIMEOUT_S = 20.0


# --------------------------------------------------------------------------- a real redis-server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """``redis-server`` on a free loopback port, no RDB snapshots; with ``aof_dir`` it
    appends every write to an AOF there and fsyncs it before answering."""

    def __init__(self, aof_dir: Path | None = None) -> None:
        assert REDIS_SERVER is not None
        self.aof_dir = aof_dir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert REDIS_SERVER is not None
        for _ in range(5):  # another process may take the free port first
            self.port = _free_port()
            args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            if self.aof_dir is not None:
                args += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.aof_dir)]
            else:
                args += ["--appendonly", "no"]
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline and self.proc.poll() is None:
                with contextlib.suppress(redis.exceptions.ConnectionError):
                    if redis.Redis(port=self.port, socket_timeout=1).ping():
                        return self
                time.sleep(0.05)
            self.stop()
        raise AssertionError("redis-server did not start")

    def client(self) -> Any:
        return redis.Redis(port=self.port, socket_timeout=5)

    def kill(self) -> None:
        """SIGKILL: no shutdown save, no AOF rewrite."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def running_redis(aof_dir: Path | None = None) -> Iterator[RedisServer]:
    srv = RedisServer(aof_dir).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (make system-deps installs Debian's)")
    with running_redis() as srv:
        yield srv


@pytest.fixture
def make_store(redis_server: RedisServer) -> Iterator[Callable[..., RedisVoiceStore]]:
    """``make_store(fingerprint="fp", **kw)``: stores under a key prefix of this test only."""
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    made: list[RedisVoiceStore] = []

    def make(fingerprint: str = "fp", **kw: Any) -> RedisVoiceStore:
        kw.setdefault("max_voices", 100)
        kw.setdefault("cache_bytes", 1 << 20)
        store = RedisVoiceStore(redis_server.url, fingerprint, key_prefix=prefix, **kw)
        made.append(store)
        return store

    yield make
    for s in made:
        s.close()


def fake_prompt(seed: int, *, icl: bool = True) -> VoiceClonePrompt:
    g = torch.Generator().manual_seed(seed)
    return VoiceClonePrompt(
        speaker_embedding=torch.randn(32, generator=g),
        ref_codes=torch.randint(0, 2048, (7, 16), generator=g) if icl else None,
        ref_text="Some words." if icl else None,
        x_vector_only=not icl,
        model_fingerprint="fp",
    )


def create(store: VoiceStore, seed: int, *, req: str | None = None, name: str = "") -> Any:
    return store.create(
        fake_prompt(seed), display_name=name, ref_audio_seconds=1.5, req_hash=req or f"req-{seed}", notes=[]
    )


# --------------------------------------------------------------------------- the store's guarantees


@needs_redis
def test_create_get_list_delete(make_store: Callable[..., RedisVoiceStore]) -> None:
    store = make_store()
    a = create(store, 1, name="Alice")
    b = create(store, 2, name="Bob")
    assert is_valid_voice_id(a.voice_id) and len(a.voice_id) == 16 and a.voice_id != b.voice_id
    assert store.get(a.voice_id) == a and store.has(b.voice_id) and len(store) == 2
    order = sorted([a, b], key=lambda r: (r.created_unix_ms, r.voice_id))  # oldest first, then by id
    assert [r.voice_id for r in store.list()] == [r.voice_id for r in order]
    assert store.prompt(a.voice_id).content_hash() == fake_prompt(1).content_hash()
    assert create(store, 1, name="Alice") == a  # the same request: the same voice, computed once
    assert store.find_by_request("req-1") == a and store.find_by_request("nope") is None
    store.delete(a.voice_id)
    assert not store.has(a.voice_id) and len(store) == 1 and store.find_by_request("req-1") is None
    for bad in (a.voice_id, "../../etc/passwd", "x" * 500, "a b c d e f g h"):
        with pytest.raises(NotFoundError):
            store.get(bad)
        with pytest.raises(NotFoundError):
            store.prompt(bad)
        with pytest.raises(NotFoundError):
            store.delete(bad)
    again = create(store, 1, name="Alice")  # deleted, then asked for again: a new voice
    assert again.voice_id != a.voice_id


@needs_redis
def test_limits_and_other_weights(make_store: Callable[..., RedisVoiceStore]) -> None:
    store = make_store(max_voices=2)
    create(store, 1)
    create(store, 2)
    with pytest.raises(CapacityError, match="max_voices"):
        create(store, 3)
    other = make_store("other-weights", max_voices=2)  # same Redis, other model: its own voices
    assert len(other) == 0 and other.list() == []
    create(other, 3)
    assert len(store) == 2 and len(other) == 1
    with pytest.raises(NotFoundError):
        other.get(store.list()[0].voice_id)


@needs_redis
def test_survives_a_server_restart(make_store: Callable[..., RedisVoiceStore]) -> None:
    first = make_store()
    made = [create(first, i, name=f"v{i}") for i in range(3)]
    first.close()
    second = make_store()  # a new server process on the same database
    # list() is ordered by (creation ms, id): voices made in the same millisecond sort by id
    assert second.list() == sorted(made, key=lambda r: (r.created_unix_ms, r.voice_id))
    for i, rec in enumerate(made):
        assert second.prompt(rec.voice_id).content_hash() == fake_prompt(i).content_hash()


@needs_redis
def test_a_delete_is_seen_by_every_server_at_once(make_store: Callable[..., RedisVoiceStore]) -> None:
    a, b = make_store(), make_store()
    rec = create(a, 1)
    assert b.prompt(rec.voice_id).content_hash() == a.prompt(rec.voice_id).content_hash()  # both cached
    assert b.cached_bytes > 0
    a.delete(rec.voice_id)
    with pytest.raises(NotFoundError):
        b.prompt(rec.voice_id)
    assert b.cached_bytes == 0


@needs_redis
def test_several_servers_writing_at_once(make_store: Callable[..., RedisVoiceStore]) -> None:
    """Four stores (four servers) x four threads: distinct requests fill the store up to
    max_voices exactly; identical requests made at once yield one voice."""
    stores = [make_store(max_voices=10) for _ in range(4)]
    results: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def worker(k: int) -> None:
        store = stores[k % 4]
        barrier.wait(10)
        for j in range(3):
            try:
                rec = create(store, 100 + 3 * k + j)  # 48 distinct requests for 10 places
                with lock:
                    results.append(rec.voice_id)
            except CapacityError as e:
                with lock:
                    errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 10 and len(set(results)) == 10 and len(errors) == 38
    assert all(len(s) == 10 for s in stores)

    same = [make_store(max_voices=10) for _ in range(4)]
    ids: list[str] = []
    barrier2 = threading.Barrier(8)

    def twin(k: int) -> None:
        barrier2.wait(10)
        rec = create(same[k % 4], 7, req="same-request")
        with lock:
            ids.append(rec.voice_id)

    for s in same:  # a fresh namespace: empty the old one first
        for rec in s.list():
            s.delete(rec.voice_id)
    threads = [threading.Thread(target=twin, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(ids) == 8 and len(set(ids)) == 1 and len(same[0]) == 1


@needs_redis
def test_redis_at_its_memory_limit(
    redis_server: RedisServer, make_store: Callable[..., RedisVoiceStore]
) -> None:
    store = make_store()
    kept = create(store, 1)
    admin = redis_server.client()
    used = int(admin.info("memory")["used_memory"])
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", str(used))  # no room for one more byte
    try:
        with pytest.raises(StoreFullError, match="out of memory"):
            create(store, 2)
        assert [r.voice_id for r in store.list()] == [kept.voice_id]  # unchanged, readable
        assert store.find_by_request("req-2") is None
        store.delete(kept.voice_id)  # deleting frees room: allowed at the limit
    finally:
        admin.config_set("maxmemory", "0")
    assert len(store) == 0
    create(store, 2)


@needs_redis
def test_redis_gone_is_unavailable_and_comes_back() -> None:
    with running_redis() as srv:
        store = RedisVoiceStore(srv.url, "fp", max_voices=10, cache_bytes=1 << 20, timeout_s=1.0)
        rec = create(store, 1)
        srv.stop()
        with pytest.raises(UnavailableError, match="unreachable"):  # bounded: timeout_s, REDIS_RETRIES
            store.get(rec.voice_id)
        store.close()
    with pytest.raises(UnavailableError, match="unreachable"):
        RedisVoiceStore(srv.url, "fp", max_voices=10, cache_bytes=0, timeout_s=1.0)  # at start-up


@needs_redis
def test_acknowledged_voices_survive_a_redis_kill_with_aof(tmp_path: Path) -> None:
    """With ``appendonly yes`` and ``appendfsync always`` a voice whose create returned is
    on disk: SIGKILL of redis-server loses none (docs/DEPLOY.md, persistence)."""
    with running_redis(tmp_path) as srv:
        store = RedisVoiceStore(srv.url, "fp", max_voices=10, cache_bytes=0)
        made = [create(store, i) for i in range(5)]
        store.close()
        srv.kill()
        srv.start()  # same directory: replays the AOF (on a new port)
        store = RedisVoiceStore(srv.url, "fp", max_voices=10, cache_bytes=0)
        assert store.list() == sorted(made, key=lambda r: (r.created_unix_ms, r.voice_id))
        assert store.prompt(made[4].voice_id).content_hash() == fake_prompt(4).content_hash()
        store.close()


# --------------------------------------------------------------------------- settings


def test_settings_are_checked(tmp_path: Path) -> None:
    for url in ("http://127.0.0.1:6379/0", "127.0.0.1:6379", "/var/lib/voices"):
        with pytest.raises(ValueError, match="voices_url"):
            ServerConfig(voices_url=url).validated()
    with pytest.raises(ValueError, match="redis_key_prefix"):
        ServerConfig(voices_url="redis://127.0.0.1:1/0", redis_key_prefix="a b").validated()
    with pytest.raises(ValueError, match="redis_timeout_s"):
        ServerConfig(voices_url="redis://127.0.0.1:1/0", redis_timeout_s=0).validated()
    with pytest.raises(ValueError, match="redis_max_connections"):
        ServerConfig(voices_url="redis://127.0.0.1:1/0", redis_max_connections=0).validated()
    assert redacted("redis://user:s3cret@db.example:6380/2") == "redis://user:***@db.example:6380/2"
    # the default backend, whichever way it is named
    assert isinstance(VoiceStore(tmp_path / "a", "fp", max_voices=1, cache_bytes=0), DirectoryVoiceStore)
    opened = open_voice_store(ServerConfig(voices_dir=tmp_path / "b"), "fp")
    assert isinstance(opened, DirectoryVoiceStore) and opened.location == str(tmp_path / "b")


def test_the_voices_flag_reaches_the_config() -> None:
    from qwen3tts_rt.cli import build_parser

    a = build_parser().parse_args(["serve", "--voices", "redis://127.0.0.1:6390/3"])
    assert a.voices == "redis://127.0.0.1:6390/3"
    a = build_parser().parse_args(["serve", "--voices", "/srv/voices"])
    assert a.voices == "/srv/voices"


# --------------------------------------------------------------------------- two real servers, one store


@needs_redis
def test_two_servers_share_voices(
    redis_server: RedisServer,
    tiny_loaded: Callable[..., Checkpoint],
    speech_wav: Callable[..., bytes],
    tmp_path: Path,
    one_torch_thread: None,
) -> None:
    from qwen3tts_rt.v1 import tts_pb2 as pb
    from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc
    from tests.server_helpers import greedy, start_server

    ckpt = tiny_loaded("base")
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    common = dict(voices_url=redis_server.url, redis_key_prefix=prefix, warmup=False)
    with (
        start_server(ckpt, tmp_path / "unused-a", **common) as a,
        start_server(ckpt, tmp_path / "unused-b", **common) as b,
        grpc.insecure_channel(a.address) as ca,
        grpc.insecure_channel(b.address) as cb,
    ):
        sa, sb = pb_grpc.TextToSpeechStub(ca), pb_grpc.TextToSpeechStub(cb)
        v = sa.CreateVoice(pb.CreateVoiceRequest(ref_audio=speech_wav(1.5), x_vector_only=True), timeout=60)
        assert [x.voice_id for x in sb.ListVoices(pb.ListVoicesRequest(), timeout=30).voices] == [v.voice_id]
        pcm = []
        for stub in (sa, sb):
            reqs = [pb.StreamRequest(config=greedy(v.voice_id, 4)), pb.StreamRequest(text="Hello there.")]
            pcm.append(b"".join(r.audio.audio for r in stub.StreamSynthesize(iter(reqs), timeout=60)))
        assert pcm[0] and pcm[0] == pcm[1]  # same weights, same voice, greedy: same bytes
        sb.DeleteVoice(pb.DeleteVoiceRequest(voice_id=v.voice_id), timeout=30)
        with pytest.raises(grpc.RpcError) as info:
            sa.GetVoice(pb.GetVoiceRequest(voice_id=v.voice_id), timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert not list((tmp_path).glob("unused-*/*.json"))  # nothing went to a directory store
