"""Faults: clients that go away at any point of a stream leave nothing behind (no live
session, no held slot, no RPC in flight, no growing memory), and SIGTERM drains a real
``qwen3tts-rt serve`` process: every stream in flight finishes with all its audio, new
calls are refused with UNAVAILABLE, health says NOT_SERVING, the process exits 0.

The random-disconnect loop is seeded (``SEED``): a failure names its run and fault, and the
same seed replays the same schedule. The soak profile (``-m soak``, ``make reliability``)
runs it hundreds of times."""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qwen3tts_rt.model.checkpoint import Checkpoint
from qwen3tts_rt.server.app import ServerThread
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc
from tests.reliability import record
from tests.server_helpers import (
    BidiCall,
    Collected,
    collect,
    greedy,
    rpc_error,
    rss_mb,
    sample,
    scrape,
    start_server,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED = 20261201
MAX_SESSIONS = 4
RSS_BOUND_MB = 30.0  # growth over the second half of the disconnect runs
FREED_WITHIN_S = 2.0  # client gone -> its session and RPC freed on the server
REPO = Path(__file__).resolve().parent.parent
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TEXT = "Hello there, this is a short test sentence for the fault runs."
SAMPLES_PER_FRAME = 1920  # at 24 kHz


def health_status(ch: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def rpc_counts(port: int, method: str) -> Counter[str]:
    """Finished RPCs of ``method`` by status code, from the server's /metrics."""
    fam = scrape(port)["qwen3tts_rpcs"]
    got: Counter[str] = Counter()
    for s in fam.samples:
        if s.name == "qwen3tts_rpcs_total" and s.labels.get("method") == method:
            got[s.labels["code"]] += int(s.value)
    return got


# --------------------------------------------------------------------------- random disconnects


@pytest.fixture(scope="module")
def server(
    tiny_loaded: Callable[..., Checkpoint], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    srv = start_server(tiny_loaded("base", 0), tmp_path_factory.mktemp("voices"), max_sessions=MAX_SESSIONS)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def voice_id(channel: grpc.Channel, speech_wav: Callable[..., bytes]) -> str:
    stub = pb_grpc.TextToSpeechStub(channel)
    return stub.CreateVoice(pb.CreateVoiceRequest(ref_audio=speech_wav(1.2), x_vector_only=True)).voice_id


def abandon(call: BidiCall) -> None:
    """The client goes away: cancel the RPC, and end the request iterator so that gRPC's
    request-consuming thread ends too (it would wait on the test's queue forever)."""
    call.cancel()
    call.close()


def read_until(call: BidiCall, stop: Callable[[pb.StreamResponse], bool]) -> None:
    for r in call:
        if stop(r):
            return


@dataclass
class Fault:
    """One way for a client to go away. ``run`` returns the call's final status."""

    name: str
    run: Callable[[grpc.Channel, str, random.Random, str], grpc.StatusCode]


def _before_config(ch: grpc.Channel, vid: str, rng: random.Random, addr: str) -> grpc.StatusCode:
    call = BidiCall(pb_grpc.TextToSpeechStub(ch))
    time.sleep(rng.uniform(0, 0.02))
    abandon(call)
    return call.call.code()


def _after_config(ch: grpc.Channel, vid: str, rng: random.Random, addr: str) -> grpc.StatusCode:
    call = BidiCall(pb_grpc.TextToSpeechStub(ch)).send(config=greedy(vid, rng.randint(4, 40)))
    time.sleep(rng.uniform(0, 0.05))  # before, while or after the session opens
    abandon(call)
    return call.call.code()


def _mid_text(ch: grpc.Channel, vid: str, rng: random.Random, addr: str) -> grpc.StatusCode:
    call = BidiCall(pb_grpc.TextToSpeechStub(ch)).send(config=greedy(vid, rng.randint(4, 40)))
    words = TEXT.split(" ")
    for w in words[: rng.randint(1, len(words) - 1)]:
        call.text(w + " ")
        time.sleep(rng.uniform(0, 0.01))
    abandon(call)
    return call.call.code()


def _mid_audio(ch: grpc.Channel, vid: str, rng: random.Random, addr: str) -> grpc.StatusCode:
    call = BidiCall(pb_grpc.TextToSpeechStub(ch)).send(config=greedy(vid, rng.randint(4, 40))).text(TEXT)
    if rng.random() < 0.5:
        call.close()  # half-closed or not: both must be freed
    chunks = rng.randint(1, 6)
    seen = [0]

    def enough(r: pb.StreamResponse) -> bool:
        seen[0] += r.WhichOneof("response") == "audio"
        return seen[0] >= chunks

    read_until(call, enough)
    abandon(call)
    return call.call.code()


def _after_flush(ch: grpc.Channel, vid: str, rng: random.Random, addr: str) -> grpc.StatusCode:
    call = BidiCall(pb_grpc.TextToSpeechStub(ch)).send(config=greedy(vid, rng.randint(4, 20)))
    call.text("First one.").flush("a").text("And the second one", " goes on.")
    if rng.random() < 0.5:
        read_until(call, lambda r: r.WhichOneof("response") == "utterance_done")
    else:
        time.sleep(rng.uniform(0, 0.03))
    abandon(call)
    return call.call.code()


def _after_half_close(ch: grpc.Channel, vid: str, rng: random.Random, addr: str) -> grpc.StatusCode:
    call = BidiCall(pb_grpc.TextToSpeechStub(ch)).send(config=greedy(vid, rng.randint(4, 40))).text(TEXT)
    call.close()
    time.sleep(rng.choice([0.0, 0.0, rng.uniform(0, 0.02)]))
    abandon(call)
    return call.call.code()


def _stop_reading(ch: grpc.Channel, vid: str, rng: random.Random, addr: str) -> grpc.StatusCode:
    """Reads one response, stops reading (a small receive window: the server's writes
    block), then the connection goes away."""
    with grpc.insecure_channel(addr, options=[("grpc.http2.bdp_probe", 0)]) as own:
        call = BidiCall(pb_grpc.TextToSpeechStub(own)).send(config=greedy(vid, 400)).text(TEXT).close()
        next(iter(call))
        time.sleep(rng.uniform(0.05, 0.4))
    call.close()
    return call.call.code()


def _deadline(ch: grpc.Channel, vid: str, rng: random.Random, addr: str) -> grpc.StatusCode:
    call = BidiCall(pb_grpc.TextToSpeechStub(ch), timeout=rng.uniform(0.02, 0.6))
    call.send(config=greedy(vid, 400)).text(TEXT).close()
    with contextlib.suppress(grpc.RpcError):
        collect(call)
    return call.call.code()


FAULTS = [
    Fault("before config", _before_config),
    Fault("after config", _after_config),
    Fault("mid text", _mid_text),
    Fault("mid audio", _mid_audio),
    Fault("after a flush", _after_flush),
    Fault("right after half-close", _after_half_close),
    Fault("stops reading, then disconnects", _stop_reading),
    Fault("short deadline", _deadline),
]
# OK: the stream had already finished when the client went away (a short utterance).
EXPECTED = {grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OK}


@dataclass
class Tally:
    by_fault: dict[str, Counter[str]] = field(default_factory=dict)

    def add(self, fault: str, code: grpc.StatusCode) -> None:
        self.by_fault.setdefault(fault, Counter())[code.name] += 1


def _idle_slots(srv: ServerThread) -> bool:
    return srv.server.runtime.require_engine().free_slots == MAX_SESSIONS


def _idle(srv: ServerThread) -> bool:
    engine = srv.server.runtime.engine
    assert engine is not None
    return engine.live_sessions == 0 and engine.free_slots == MAX_SESSIONS and srv.server.inflight.count == 0


@pytest.mark.parametrize(
    "runs", [pytest.param(40, id="40"), pytest.param(400, id="400", marks=pytest.mark.soak)]
)
def test_random_disconnects_leave_nothing_behind(
    server: ServerThread,
    channel: grpc.Channel,
    voice_id: str,
    runs: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng = random.Random(SEED)
    schedule = [FAULTS[i % len(FAULTS)] for i in range(runs)]
    rng.shuffle(schedule)
    stub = pb_grpc.TextToSpeechStub(channel)
    # fixed packets: the audio is compared bit for bit (adaptive packets group frames by timing)
    config = greedy(voice_id, 12, packet_policy=pb.PACKET_POLICY_FIXED)
    reference = collect(
        stub.StreamSynthesize(iter([pb.StreamRequest(config=config), pb.StreamRequest(text=TEXT)]))
    )
    assert server.metrics_port is not None
    codes_before = rpc_counts(server.metrics_port, "StreamSynthesize")
    threads_before = threading.active_count()
    tally = Tally()
    freed_ms: list[float] = []
    rss_mid = 0.0
    t0 = time.monotonic()
    caplog.set_level(logging.ERROR, logger="qwen3tts_rt")
    for i, fault in enumerate(schedule):
        if i == runs // 2:  # the first half warms up (allocator pools, gRPC buffers)
            rss_mid = rss_mb()
        code = fault.run(channel, voice_id, rng, server.address)
        assert code in EXPECTED, f"run {i} ({fault.name}, seed {SEED}): {code}"
        tally.add(fault.name, code)
        # the server frees what the call held soon after the client went away
        gone = time.monotonic()
        assert wait_for(lambda: _idle(server), timeout=FREED_WITHIN_S, interval=0.002), (
            f"run {i} ({fault.name}, seed {SEED}): still held {FREED_WITHIN_S} s after the client went away: "
            f"live {server.server.runtime.engine.live_sessions}, in flight {server.server.inflight.count}"  # type: ignore[union-attr]
        )
        freed_ms.append((time.monotonic() - gone) * 1000)
    elapsed = time.monotonic() - t0

    # nothing is left: no live session, every slot free, no RPC in flight, the gauge at 0
    assert wait_for(lambda: _idle(server), timeout=10), (
        server.server.runtime.engine.live_sessions,  # type: ignore[union-attr]
        server.server.runtime.engine.free_slots,  # type: ignore[union-attr]
        server.server.inflight.count,
    )
    assert sample(scrape(server.metrics_port), "qwen3tts_live_sessions", "qwen3tts_live_sessions") == 0
    rss_end = rss_mb()
    growth = rss_end - rss_mid
    # the server ended every one of them without an internal error, and counted the cancels
    # as CANCELLED. (grpc.aio ends the request iterator of a cancelled call as if the client
    # had half-closed, and its context never reports the cancellation: a cancel before the
    # config can still be counted as INVALID_ARGUMENT "missing config" when the handler
    # answers before its task is cancelled.)
    codes = rpc_counts(server.metrics_port, "StreamSynthesize") - codes_before
    assert sum(codes.values()) >= runs
    assert set(codes) <= {"OK", "CANCELLED", "DEADLINE_EXCEEDED", "INVALID_ARGUMENT"}, codes
    assert codes["CANCELLED"] > 0, codes  # client cancels are not counted as OK
    assert codes["INVALID_ARGUMENT"] <= sum(f.name in ("before config", "after config") for f in schedule), (
        codes
    )
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert wait_for(lambda: threading.active_count() <= threads_before + 2, timeout=10), (
        threading.active_count(),
        threads_before,
    )
    # and it still speaks exactly as before
    after = collect(
        stub.StreamSynthesize(iter([pb.StreamRequest(config=config), pb.StreamRequest(text=TEXT)]))
    )
    np.testing.assert_array_equal(after.pcm(0), reference.pcm(0))

    record(
        "faults",
        f"random client disconnects ({runs} runs, seed {SEED})",
        runs=runs,
        faults=", ".join(f.name for f in FAULTS),
        client_codes="; ".join(
            f"{name}: {', '.join(f'{k} {v}' for k, v in sorted(c.items()))}"
            for name, c in sorted(tally.by_fault.items())
        ),
        server_codes=", ".join(f"{k} {v}" for k, v in sorted(codes.items())),
        leaked_sessions=0,
        free_slots=f"{MAX_SESSIONS}/{MAX_SESSIONS}",
        freed_after_ms_p50=round(float(np.percentile(freed_ms, 50)), 1),
        freed_after_ms_max=round(max(freed_ms), 1),
        rss_growth_mb=round(growth, 1),
        rss_bound_mb=RSS_BOUND_MB,
        seconds=round(elapsed, 1),
    )
    print(
        f"\n{runs} disconnect runs in {elapsed:.1f} s; RSS {rss_mid:.0f} -> {rss_end:.0f} MB ({growth:+.1f} MB)"
    )
    for name, c in sorted(tally.by_fault.items()):
        print(f"  {name}: {dict(c)}")
    assert growth < RSS_BOUND_MB, f"RSS grew {growth:.1f} MB over the second half of {runs} runs"


# --------------------------------------------------------------------------- SIGTERM drain in a real process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    proc: subprocess.Popen[str]
    addr: str
    log: Path

    def output(self) -> str:
        return self.log.read_text()


def serve_process(ckpt_dir: Path, tmp_path: Path, *extra: str) -> Iterator[Served]:
    """``qwen3tts-rt serve`` on a free port, SERVING; killed at the end if still running."""
    port = _free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qwen3tts_rt.cli", "serve", "--model", str(ckpt_dir),
             "--port", str(port), "--metrics-port", "-1", "--voices-dir", str(tmp_path / "voices"),
             "--torch-threads", "1", *extra],
            stdout=out, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        )  # fmt: skip
    served = Served(proc, f"127.0.0.1:{port}", log)
    try:
        with grpc.insecure_channel(served.addr) as ch:

            def serving() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"the server exited:\n{served.output()}")
                try:
                    return health_status(ch) == SERVING
                except grpc.RpcError:
                    return False

            assert wait_for(serving, timeout=120, interval=0.2), served.output()
        yield served
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@dataclass
class InFlight:
    """A stream read to its end on a thread: what it got, its status, when it ended."""

    name: str
    started: threading.Event = field(default_factory=threading.Event)
    got: Collected | None = None
    code: grpc.StatusCode | None = None
    details: str = ""
    ended_at: float = 0.0

    def read(self, responses: Iterator[pb.StreamResponse], call: grpc.Call) -> threading.Thread:
        def on(r: pb.StreamResponse) -> None:
            if r.WhichOneof("response") == "audio":
                self.started.set()

        def run() -> None:
            try:
                self.got = collect(responses, on)
            except grpc.RpcError:
                pass
            finally:
                self.code, self.details = call.code(), call.details() or ""
                self.ended_at = time.monotonic()
                self.started.set()

        t = threading.Thread(target=run, name=f"stream-{self.name}", daemon=True)
        t.start()
        return t


def _check_audio(got: Collected | None, utterances: list[int]) -> None:
    """Every utterance done (by its frame cap) with all its frames, contiguous, in order."""
    assert got is not None
    assert [d.utterance_id for d in got.dones] == list(range(len(utterances)))
    for d, frames in zip(got.dones, utterances):
        assert d.reason == pb.UtteranceDone.CAP and d.frames == frames - 1, d
        assert len(got.pcm(d.utterance_id)) == (frames - 1) * SAMPLES_PER_FRAME
    for uid in range(len(utterances)):
        chunks = [c for c in got.chunks if c.utterance_id == uid]
        offsets = np.cumsum([0] + [len(c.audio) // 2 for c in chunks[:-1]])
        assert [c.sample_offset for c in chunks] == list(offsets)


@pytest.fixture
def drain_server(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> Iterator[Served]:
    yield from serve_process(tiny_checkpoint("base", 0), tmp_path, "--grace", "60", "--max-sessions", "8")


def test_sigterm_drains_every_stream_in_flight(
    drain_server: Served, speech_wav: Callable[..., bytes]
) -> None:
    """Four calls in flight at SIGTERM (two half-closed streams, one still sending text
    that flushes a second utterance during the drain, one Synthesize): all finish OK with
    all their audio, equal to the same requests before the signal; meanwhile new calls get
    UNAVAILABLE and health NOT_SERVING; the process exits 0 well within the grace."""
    srv = drain_server
    grace = 60.0
    with grpc.insecure_channel(srv.addr) as ch:
        stub = pb_grpc.TextToSpeechStub(ch)
        vid = stub.CreateVoice(pb.CreateVoiceRequest(ref_audio=speech_wav(1.2), x_vector_only=True)).voice_id
        frames = {"a": 40, "b": 60, "c": 30, "synth": 50}

        def run_all(during: Callable[[], None] | None) -> dict[str, InFlight]:
            streams = {name: InFlight(name) for name in frames}
            threads = []
            a = BidiCall(stub).send(config=greedy(vid, frames["a"])).text(TEXT).close()
            threads.append(streams["a"].read(iter(a), a.call))
            b = BidiCall(stub).send(config=greedy(vid, frames["b"])).text("A longer ", "one, ", TEXT).close()
            threads.append(streams["b"].read(iter(b), b.call))
            c = BidiCall(stub).send(config=greedy(vid, frames["c"])).text("Still ", "writing")
            threads.append(streams["c"].read(iter(c), c.call))
            synth = stub.Synthesize(pb.SynthesizeRequest(config=greedy(vid, frames["synth"]), text=TEXT))

            def read_synth() -> None:
                s = streams["synth"]
                try:
                    got = Collected()
                    for p in synth:
                        got.audio.setdefault(0, bytearray()).extend(p.audio)
                        s.started.set()
                    s.got = got
                finally:
                    s.code, s.details, s.ended_at = synth.code(), synth.details() or "", time.monotonic()
                    s.started.set()

            threads.append(threading.Thread(target=read_synth, daemon=True))
            threads[-1].start()
            for s in streams.values():
                assert s.started.wait(60), s.name
            if during is not None:
                during()
            c.text(" this sentence.").flush("c0").text("And one more.").close()  # text during the drain
            for t in threads:
                t.join(60)
            return streams

        before = run_all(None)
        refused: dict[str, grpc.RpcError] = {}
        signalled: list[float] = []  # when SIGTERM was sent, when the last refusal came back

        def sigterm_then_call() -> None:
            srv.proc.send_signal(signal.SIGTERM)
            signalled.append(time.monotonic())
            assert wait_for(lambda: health_status(ch) == NOT_SERVING, timeout=10)
            refused["StreamSynthesize"] = rpc_error(
                lambda: collect(
                    stub.StreamSynthesize(
                        iter([pb.StreamRequest(config=greedy(vid, 5)), pb.StreamRequest(text="Hi.")]),
                        timeout=10,
                    )
                )
            )
            refused["Synthesize"] = rpc_error(
                lambda: list(
                    stub.Synthesize(pb.SynthesizeRequest(config=greedy(vid, 5), text="Hi."), timeout=10)
                )
            )
            refused["GetServerInfo"] = rpc_error(
                lambda: stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
            )
            refused["CreateVoice"] = rpc_error(
                lambda: stub.CreateVoice(
                    pb.CreateVoiceRequest(ref_audio=speech_wav(1.2, seed=3), x_vector_only=True), timeout=10
                )
            )
            signalled.append(time.monotonic())

        during = run_all(sigterm_then_call)

    for name, s in during.items():
        assert s.code == grpc.StatusCode.OK, (name, s.code, s.details, srv.output())
    for name in ("a", "b"):
        _check_audio(during[name].got, [frames[name]])
    _check_audio(during["c"].got, [frames["c"], frames["c"]])
    assert during["c"].got is not None and [d.client_id for d in during["c"].got.dones] == ["c0", ""]
    synth_pcm = during["synth"].got.pcm(0) if during["synth"].got else np.zeros(0)
    assert len(synth_pcm) == (frames["synth"] - 1) * SAMPLES_PER_FRAME
    for name in frames:  # the same requests before the signal gave the same audio
        got, want = during[name].got, before[name].got
        assert got is not None and want is not None
        for uid in want.audio:
            # to rounding: batched decoding rounds differently from decoding alone (~1 LSB)
            np.testing.assert_allclose(got.pcm(uid), want.pcm(uid), atol=2, rtol=0, err_msg=f"{name} {uid}")
    for method, err in refused.items():
        assert err.code() == grpc.StatusCode.UNAVAILABLE, (method, err.code(), err.details())
        assert "shutting down" in err.details(), (method, err.details())
    # the refusals came while the streams were still being served
    assert len(signalled) == 2 and signalled[1] < max(s.ended_at for s in during.values())

    code = srv.proc.wait(grace)
    exited_s = time.monotonic() - signalled[0]
    assert code == 0, srv.output()
    assert exited_s < grace
    last_stream_s = max(s.ended_at for s in during.values()) - signalled[0]
    record(
        "faults",
        "SIGTERM with 4 calls in flight (qwen3tts-rt serve process)",
        in_flight="2 half-closed streams, 1 stream still sending text (flushes during the drain), 1 Synthesize",
        finished_ok=f"{sum(s.code == grpc.StatusCode.OK for s in during.values())}/4",
        audio="complete, equal to the same requests before the signal",
        refused_during_drain=", ".join(f"{m} {e.code().name}" for m, e in refused.items()),
        health="NOT_SERVING",
        exit_code=code,
        last_stream_done_s=round(last_stream_s, 2),
        exit_after_s=round(exited_s, 2),
        grace_s=grace,
    )


@pytest.fixture
def short_grace_server(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> Iterator[Served]:
    yield from serve_process(tiny_checkpoint("base", 0), tmp_path, "--grace", "2")


def test_sigterm_grace_ends_a_stream_that_never_finishes(
    short_grace_server: Served, speech_wav: Callable[..., bytes]
) -> None:
    """A stream whose client never half-closes holds the drain only for the grace: then it
    is cut (CANCELLED or UNAVAILABLE) and the process still exits 0."""
    srv = short_grace_server
    grace = 2.0
    with grpc.insecure_channel(srv.addr) as ch:
        stub = pb_grpc.TextToSpeechStub(ch)
        vid = stub.CreateVoice(pb.CreateVoiceRequest(ref_audio=speech_wav(1.2), x_vector_only=True)).voice_id
        stuck = InFlight("stuck")
        call = BidiCall(stub).send(config=greedy(vid, 5000)).text("This stream never ends its text")
        reader = stuck.read(iter(call), call.call)
        assert stuck.started.wait(60)
        srv.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        code = srv.proc.wait(grace + 20)
        exited_s = time.monotonic() - t0
        reader.join(10)
        call.close()
    assert code == 0, srv.output()
    assert grace - 0.5 <= exited_s < grace + 10, exited_s
    assert stuck.code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), (stuck.code, stuck.details)
    record(
        "faults",
        "SIGTERM with a stream that never half-closes",
        grace_s=grace,
        stream_code=stuck.code.name if stuck.code else None,
        exit_code=code,
        exit_after_s=round(exited_s, 2),
    )


# --------------------------------------------------------------------------- text after the frame cap


def test_text_after_the_frame_cap_keeps_the_engine_alive(
    server: ServerThread, channel: grpc.Channel, voice_id: str
) -> None:
    """An utterance stopped by its frame cap (``max_new_tokens``) while the client is still
    writing: the client's next delta, flush or half-close must not break the engine (it
    used to index the finished utterance: the device worker died and every stream hung)."""
    stub = pb_grpc.TextToSpeechStub(channel)
    for then in ("text", "flush", "half-close"):
        call = BidiCall(stub, timeout=30).send(config=greedy(voice_id, 4)).text(TEXT)  # not ended
        responses = iter(call)
        audio = 0
        for r in responses:  # the 3 capped frames arrive; the utterance's end waits for its text end
            if r.WhichOneof("response") == "audio":
                audio += len(r.audio.audio)
            if audio >= 3 * 1920 * 2:
                break
        assert wait_for(lambda: _idle_slots(server), timeout=10)  # generation over, slot free
        if then == "text":
            call.text(" and more words after the cap.")
        elif then == "flush":
            call.flush("next").text("A new utterance.")
        call.close()
        try:
            rest = collect(responses)
        finally:
            call.close()
        assert call.call.code() == grpc.StatusCode.OK, (then, call.call.details())
        assert rest.dones[0].reason == pb.UtteranceDone.CAP and rest.dones[0].frames == 3, rest.dones
        if then == "flush":
            assert rest.dones[0].client_id == "next"
        if then == "flush":  # the utterance after the flush is spoken
            assert rest.dones and rest.dones[-1].utterance_id == 1 and len(rest.pcm(1)) > 0, rest.dones
    # the engine still serves
    assert wait_for(lambda: _idle(server), timeout=10)
    ok = collect(
        stub.StreamSynthesize(
            iter([pb.StreamRequest(config=greedy(voice_id, 6)), pb.StreamRequest(text="Hi.")]), timeout=30
        )
    )
    assert [d.frames for d in ok.dones] == [5]
