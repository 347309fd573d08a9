"""The voice store under faults: a server killed with SIGKILL while creating voices
restarts with every voice it had acknowledged and no partial one; a full disk (a real
tmpfs filled up, and RLIMIT_FSIZE on the server process) makes CreateVoice fail with
RESOURCE_EXHAUSTED while the store stays intact and the server keeps serving.

Two kinds of kill: a real ``qwen3tts-rt serve`` process killed at random moments of a
loop of CreateVoice calls (few kills: a start costs seconds), and a store writer killed
at random moments of its file writes (many kills: it is forked from a process that has
already imported everything). Run as ``python -m tests.test_voice_store_faults writer DIR``
this module is that writer.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import queue
import random
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qwen3tts_rt.audio import write_wav
from qwen3tts_rt.engine.voices import VoiceClonePrompt
from qwen3tts_rt.server import voice_store as vs
from qwen3tts_rt.server.voice_store import StoreFullError, VoiceStore
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc
from tests.reliability import record

REPO = Path(__file__).resolve().parent.parent
FINGERPRINT = "fault-test"


# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wav(seed: int, seconds: float = 1.2) -> bytes:
    from tests.conftest import speech_like

    buf = io.BytesIO()
    write_wav(buf, speech_like(seconds, 24000, seed), 24000)
    return buf.getvalue()


class Served:
    """A ``qwen3tts-rt serve`` subprocess; its output is drained by a thread (a pipe, not a
    file: RLIMIT_FSIZE would also limit a log file)."""

    def __init__(self, model: Path, voices: Path) -> None:
        self.model, self.voices = model, voices
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.addr = ""

    def start(self, timeout: float = 120.0) -> Served:
        port = _free_port()
        self.addr = f"127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qwen3tts_rt.cli", "serve", "--model", str(self.model),
             "--port", str(port), "--metrics-port", "-1", "--voices-dir", str(self.voices),
             "--torch-threads", "1", "--no-warmup"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        )  # fmt: skip
        out = self.proc.stdout
        assert out is not None
        threading.Thread(target=lambda: self.lines.extend(out), daemon=True).start()
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.addr) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"the server exited:\n{self.log}")
                try:
                    req = health_pb2.HealthCheckRequest()
                    if health.Check(req, timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        return self
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"the server did not report SERVING in {timeout} s:\n{self.log}")
                time.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log(self) -> str:
        return "".join(self.lines[-60:])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)


@contextlib.contextmanager
def served(model: Path, voices: Path) -> Iterator[Served]:
    srv = Served(model, voices)
    try:
        yield srv.start()
    finally:
        srv.kill()


def store_files(voices: Path) -> tuple[list[str], list[str], list[str]]:
    """(temp files, prompts without a record, records without a prompt) in the directory."""
    names = {p.name for p in voices.iterdir()}
    tmp = sorted(n for n in names if n.startswith(".tmp-"))
    orphans = sorted(n for n in names if n.endswith(".safetensors") and n[:-12] + ".json" not in names)
    lonely = sorted(n for n in names if n.endswith(".json") and n[:-5] + ".safetensors" not in names)
    return tmp, orphans, lonely


def stream_frames(stub: pb_grpc.TextToSpeechStub, voice_id: str, frames: int = 3) -> int:
    """Codec frames of a short greedy stream with ``voice_id`` (raises on any error)."""
    cfg = pb.StreamConfig(voice_id=voice_id, sampling=pb.SamplingParams(greedy=True, max_new_tokens=frames))
    n = 0
    for r in stub.StreamSynthesize(
        iter([pb.StreamRequest(config=cfg), pb.StreamRequest(text="Still here.")]), timeout=60
    ):
        if r.WhichOneof("response") == "utterance_done":
            n += r.utterance_done.frames
    return n


def check_store(
    stub: pb_grpc.TextToSpeechStub, voices: Path, acked: set[str], streamed: set[str]
) -> set[str]:
    """After a restart: every acknowledged voice is listed, every listed voice's prompt
    loads and streams, no temp or orphan file is left. Returns the listed ids."""
    listed = {v.voice_id for v in stub.ListVoices(pb.ListVoicesRequest(), timeout=30).voices}
    missing = acked - listed
    assert not missing, f"acknowledged voices lost: {sorted(missing)}"
    assert store_files(voices) == ([], [], []), store_files(voices)
    for vid in sorted(listed):
        prompt = VoiceClonePrompt.load(voices / f"{vid}.safetensors")
        assert prompt.speaker_embedding.numel() > 0 and torch.isfinite(prompt.speaker_embedding).all()
        if vid not in streamed:
            assert stream_frames(stub, vid) > 0
            streamed.add(vid)
    return listed


# --------------------------------------------------------------------------- SIGKILL of a real server


def _sigkill_cycles(model: Path, voices: Path, kills: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    acked: set[str] = set()
    streamed: set[str] = set()
    lock = threading.Lock()
    counter = iter(range(10**9))
    mid_write = in_flight_done = attempts = 0

    voices_before = 0
    for k in range(kills):
        with served(model, voices) as srv, grpc.insecure_channel(srv.addr) as ch:
            stub = pb_grpc.TextToSpeechStub(ch)
            if k == 0:  # the voices created before any fault
                for i in range(3):
                    req = pb.CreateVoiceRequest(ref_audio=_wav(i), x_vector_only=True)
                    acked.add(stub.CreateVoice(req).voice_id)
                voices_before = len(acked)
            listed = check_store(stub, voices, acked, streamed)
            in_flight_done += len(listed - acked)  # finished on disk, killed before the answer
            acked.update(listed)
            started = threading.Event()

            def creator(stub: pb_grpc.TextToSpeechStub, started: threading.Event) -> None:
                nonlocal attempts
                while True:
                    n = next(counter) + 100
                    icl = n % 2 == 0
                    req = pb.CreateVoiceRequest(
                        ref_audio=_wav(n), x_vector_only=not icl, ref_text="Some words." if icl else ""
                    )
                    started.set()
                    with lock:
                        attempts += 1
                    try:
                        v = stub.CreateVoice(req, timeout=30)
                    except grpc.RpcError:
                        return  # the server is gone
                    with lock:
                        acked.add(v.voice_id)

            workers = [threading.Thread(target=creator, args=(stub, started), daemon=True) for _ in range(2)]
            for w in workers:
                w.start()
            assert started.wait(10)
            threading.Event().wait(rng.uniform(0.0, 0.8))  # the fault: a random moment
            srv.kill()
            for w in workers:
                w.join(30)
                assert not w.is_alive()
            tmp, orphans, _ = store_files(voices)
            mid_write += bool(tmp or orphans)

    with served(model, voices) as srv, grpc.insecure_channel(srv.addr) as ch:
        stub = pb_grpc.TextToSpeechStub(ch)
        listed = check_store(stub, voices, acked, streamed)
        in_flight_done += len(listed - acked)
    return {
        "kills": kills,
        "voices_before": voices_before,
        "voices_after": len(listed),
        "acknowledged": len(acked),
        "create_calls": attempts,
        "finished_unacknowledged": in_flight_done,
        "kills_with_leftovers": mid_write,
        "partial": 0,
    }


@pytest.mark.parametrize(
    "kills", [pytest.param(3, id="3-kills"), pytest.param(20, id="20-kills", marks=pytest.mark.soak)]
)
def test_sigkill_during_create_voice_keeps_the_store(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path, kills: int
) -> None:
    t0 = time.monotonic()
    figures = _sigkill_cycles(tiny_checkpoint("base", 0), tmp_path / "voices", kills, seed=kills)
    record(
        "faults",
        "SIGKILL of `serve` during CreateVoice loops",
        seconds=round(time.monotonic() - t0, 1),
        **figures,
    )
    assert figures["create_calls"] >= kills  # every kill met CreateVoice calls in flight


# --------------------------------------------------------------------------- SIGKILL of a store writer mid-write


def _prompt(seed: int, i: int) -> VoiceClonePrompt:
    g = torch.Generator().manual_seed(seed * 100_003 + i)
    frames = int(torch.randint(500, 3000, (1,), generator=g))  # 64-384 KB of codes: a long write
    return VoiceClonePrompt(
        speaker_embedding=torch.randn(64, generator=g),
        ref_codes=torch.randint(0, 2048, (frames, 16), generator=g),
        ref_text=f"voice {seed}/{i}",
        x_vector_only=False,
        model_fingerprint=FINGERPRINT,
    )


def _writer_main(root: str) -> None:
    """Fork a child per ``go SEED`` line; the child creates voices until it is killed and
    prints ``made ID SEED I`` after each create returns."""
    torch.set_num_threads(1)
    print("ready", flush=True)
    for line in sys.stdin:
        seed = int(line.split()[1])
        pid = os.fork()
        if pid == 0:  # the child
            try:
                store = VoiceStore(root, FINGERPRINT, max_voices=10**6, cache_bytes=0)
                for i in range(10**6):
                    rec = store.create(
                        _prompt(seed, i), display_name=f"v{seed}-{i}", ref_audio_seconds=1.0,
                        req_hash=f"{seed}-{i}", notes=[],
                    )  # fmt: skip
                    os.write(1, f"made {rec.voice_id} {seed} {i}\n".encode())
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(0)
        print(f"child {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exited {pid} {status}", flush=True)


def _store_kill_loop(voices: Path, kills: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    voices.mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.test_voice_store_faults", "writer", str(voices)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None and proc.stdin is not None
    out = proc.stdout
    threading.Thread(target=lambda: [lines.put(x) for x in out], daemon=True).start()
    acked: dict[str, tuple[int, int]] = {}
    leftovers = tmp_seen = orphans_seen = 0

    def expect(prefix: str, timeout: float = 60) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"the writer said nothing starting with {prefix!r}") from None
            parts = line.split()
            if parts[0] == "made":
                acked[parts[1]] = (int(parts[2]), int(parts[3]))
            if parts[0] == prefix:
                return parts

    try:
        expect("ready", timeout=120)
        for k in range(kills):
            proc.stdin.write(f"go {k}\n")
            proc.stdin.flush()
            child = int(expect("child")[1])
            threading.Event().wait(rng.uniform(0.02, 0.3))  # the fault: a random moment
            os.kill(child, signal.SIGKILL)
            status = int(expect("exited")[2])
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            tmp, orphans, lonely = store_files(voices)
            assert not lonely  # a record is never written before its prompt
            leftovers += bool(tmp or orphans)
            tmp_seen += len(tmp)
            orphans_seen += len(orphans)
            store = VoiceStore(voices, FINGERPRINT, max_voices=10**6, cache_bytes=0)  # "the restart"
            assert store_files(voices) == ([], [], [])
            listed = {r.voice_id: r for r in store.list()}
            missing = set(acked) - set(listed)
            assert not missing, f"acknowledged voices lost after kill {k}: {sorted(missing)}"
        # every voice on disk is whole: its prompt is exactly what was written
        for vid, rec in listed.items():
            s, i = map(int, rec.request_hash.split("-"))
            want, got = _prompt(s, i), store.prompt(vid)
            assert torch.equal(got.ref_codes, want.ref_codes) and torch.equal(  # type: ignore[arg-type]
                got.speaker_embedding, want.speaker_embedding
            )
            assert rec.display_name == f"v{s}-{i}"
    finally:
        proc.kill()
        proc.wait(30)
    return {
        "kills": kills,
        "voices_after": len(listed),
        "acknowledged": len(acked),
        "kills_with_leftovers": leftovers,
        "temp_files_cleaned": tmp_seen,
        "orphan_prompts_cleaned": orphans_seen,
        "partial": 0,
    }


@pytest.mark.parametrize(
    "kills", [pytest.param(25, id="25-kills"), pytest.param(300, id="300-kills", marks=pytest.mark.soak)]
)
def test_sigkill_mid_write_never_leaves_a_partial_voice(tmp_path: Path, kills: int) -> None:
    t0 = time.monotonic()
    figures = _store_kill_loop(tmp_path / "voices", kills, seed=kills)
    record(
        "faults", "SIGKILL of a store writer mid-write", seconds=round(time.monotonic() - t0, 1), **figures
    )
    assert figures["acknowledged"] > 0


# --------------------------------------------------------------------------- full disk


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "2m") -> Iterator[bool]:
    """A real tmpfs of ``size`` at ``where`` when this process may mount (root); yields
    whether it is one (else ``where`` is a plain directory)."""
    where.mkdir(parents=True)
    mounted = False
    if os.geteuid() == 0 and sys.platform == "linux":
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
            capture_output=True, text=True,
        )  # fmt: skip
        mounted = r.returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:
        for chunk in (64 * 1024, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    return filler


def test_full_disk_is_an_error_not_a_corrupt_store(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    with small_tmpfs(tmp_path / "disk") as is_tmpfs:
        voices = tmp_path / "disk" / "voices"
        acked: set[str] = set()
        streamed: set[str] = set()
        seen: dict[str, str] = {}
        with served(tiny_checkpoint("base", 0), voices) as srv, grpc.insecure_channel(srv.addr) as ch:
            stub = pb_grpc.TextToSpeechStub(ch)
            for i in range(2):
                acked.add(
                    stub.CreateVoice(pb.CreateVoiceRequest(ref_audio=_wav(i), x_vector_only=True)).voice_id
                )

            def refused(how: str, seed: int) -> None:
                before = sorted(p.name for p in voices.iterdir())
                t0 = time.monotonic()
                try:
                    stub.CreateVoice(
                        pb.CreateVoiceRequest(ref_audio=_wav(seed), ref_text="Some words."), timeout=30
                    )
                except grpc.RpcError as e:
                    err = e
                else:
                    raise AssertionError(f"CreateVoice succeeded on a full disk ({how})")
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
                assert "out of space" in err.details() and "not saved" in err.details()
                assert str(voices) not in err.details()  # server paths stay in the server log
                seen[how] = err.details()
                assert sorted(p.name for p in voices.iterdir()) == before  # nothing half-written
                assert {v.voice_id for v in stub.ListVoices(pb.ListVoicesRequest()).voices} == acked
                assert stub.GetServerInfo(pb.GetServerInfoRequest()).model_kind == "base"  # still serving
                for vid in acked:
                    assert stream_frames(stub, vid) > 0
                record("faults", f"full disk during CreateVoice ({how})", code=err.code().name,
                       message=err.details(), seconds=round(time.monotonic() - t0, 2))  # fmt: skip

            if is_tmpfs:  # a real ENOSPC
                filler = _fill(tmp_path / "disk")
                refused("tmpfs full, ENOSPC", 10)
                filler.unlink()
                acked.add(
                    stub.CreateVoice(pb.CreateVoiceRequest(ref_audio=_wav(11), x_vector_only=True)).voice_id
                )

            # RLIMIT_FSIZE on the server process: writes past 256 bytes fail with EFBIG
            soft, hard = resource.prlimit(srv.pid, resource.RLIMIT_FSIZE)
            resource.prlimit(srv.pid, resource.RLIMIT_FSIZE, (256, hard))
            try:
                refused("RLIMIT_FSIZE 256 bytes, EFBIG", 12)
            finally:
                resource.prlimit(srv.pid, resource.RLIMIT_FSIZE, (soft, hard))
            acked.add(
                stub.CreateVoice(pb.CreateVoiceRequest(ref_audio=_wav(13), x_vector_only=True)).voice_id
            )
            srv.kill()  # no clean shutdown either
        with served(tiny_checkpoint("base", 0), voices) as srv, grpc.insecure_channel(srv.addr) as ch:
            listed = check_store(pb_grpc.TextToSpeechStub(ch), voices, acked, streamed)
            assert listed == acked
        assert len(seen) == (2 if is_tmpfs else 1)
        record("faults", "store after full-disk failures and a restart", tmpfs=is_tmpfs, voices=len(listed),
               leftovers=0)  # fmt: skip


# --------------------------------------------------------------------------- injected failures (no server)


def _store(root: Path) -> VoiceStore:
    return VoiceStore(root, FINGERPRINT, max_voices=100, cache_bytes=1 << 20)


def _create(store: VoiceStore, i: int) -> vs.VoiceRecord:
    return store.create(
        _prompt(7, i), display_name=f"v{i}", ref_audio_seconds=1.0, req_hash=f"7-{i}", notes=[]
    )


@pytest.mark.parametrize("fail_on", [".safetensors", ".json"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_no_space_on_either_file_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_on: str, code: int
) -> None:
    store = _store(tmp_path / "v")
    kept = _create(store, 0)
    real = vs._atomic_write

    def failing(dest: Path, write: Callable[[Path], object]) -> None:
        if dest.suffix == fail_on:

            def partial(p: Path) -> None:  # some bytes reach the temp file, then the disk is full
                p.write_bytes(b"half")
                raise OSError(code, os.strerror(code))

            real(dest, partial)
        else:
            real(dest, write)

    monkeypatch.setattr(vs, "_atomic_write", failing)
    with pytest.raises(StoreFullError, match="out of space"):
        _create(store, 1)
    assert [r.voice_id for r in store.list()] == [kept.voice_id]
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == [
        f"{kept.voice_id}.json",
        f"{kept.voice_id}.safetensors",
    ]
    assert store.find_by_request("7-1") is None  # a retry computes it again
    monkeypatch.setattr(vs, "_atomic_write", real)
    again = _create(store, 1)
    assert {r.voice_id for r in _store(tmp_path / "v").list()} == {kept.voice_id, again.voice_id}


def test_safetensors_no_space_message_is_recognised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """safetensors reports a Rust I/O error as text only; it still means a full disk."""
    store = _store(tmp_path / "v")

    def rust_error(self: VoiceClonePrompt, path: object) -> None:
        Path(str(path)).write_bytes(b"x")
        raise RuntimeError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(VoiceClonePrompt, "save", rust_error)
    with pytest.raises(StoreFullError):
        _create(store, 0)
    assert list((tmp_path / "v").iterdir()) == []


def test_other_write_errors_are_not_called_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(tmp_path / "v")
    real = vs._atomic_write

    def eio(dest: Path, write: Callable[[Path], object]) -> None:
        if dest.suffix == ".json":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(dest, write)

    monkeypatch.setattr(vs, "_atomic_write", eio)
    with pytest.raises(OSError) as info:
        _create(store, 0)
    assert not isinstance(info.value, StoreFullError) and info.value.errno == errno.EIO  # -> INTERNAL
    assert list((tmp_path / "v").iterdir()) == [] and len(store) == 0


if __name__ == "__main__" and sys.argv[1:2] == ["writer"]:
    _writer_main(sys.argv[2])
