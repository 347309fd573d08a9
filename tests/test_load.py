"""Load on the tiny checkpoint: the session limit holds under bursts (RESOURCE_EXHAUSTED
naming max_sessions, never more live sessions than the limit), a client that does not read
holds a bounded output backlog (``EngineConfig.max_buffered_packets``) and a bounded queue
of utterances (``max_pending_utterances``), and many short streams, one after another or
all at once, end without an unexpected error and without growing memory.

The full sizes (1,000 sequential, 200 concurrent streams) are ``@pytest.mark.soak``
(``make reliability``); the default run does shortened versions."""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest

from qwen3tts_rt.engine.engine import Engine
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

LIMIT = 3  # max_sessions of the limit tests
BIG = 256  # max_sessions of the throughput tests (room for 200 at once)
RSS_TARGET_MB = 50.0  # growth after warm-up (issue 8)
WARMUP_ROUNDS = 2  # of the concurrent test, before RSS is measured
SHORT_FRAMES = 4  # max_new_tokens of a short stream: 3 frames, 240 ms of audio
SAMPLES_PER_FRAME = 1920
LONG_TEXT = "One two three four five six seven eight nine ten."  # ~110 frames by the cap


def engine_of(srv: ServerThread) -> Engine:
    engine = srv.server.runtime.engine
    assert engine is not None
    return engine


def idle(srv: ServerThread) -> bool:
    engine = engine_of(srv)
    return (
        engine.live_sessions == 0
        and engine.free_slots == engine.config.max_sessions
        and srv.server.inflight.count == 0
    )


def set_engine_limits(srv: ServerThread, **limits: int) -> None:
    """Change a running server's engine limits (the worker reads them every tick), so one
    server serves both the control and the limited run; a server is normally started with
    them (``EngineConfig.max_buffered_packets`` / ``max_pending_utterances``, `serve` flags)."""
    engine = engine_of(srv)
    engine.config = dataclasses.replace(engine.config, **limits)
    engine.table.limits = engine.config.limits  # the session table reads its limits every tick


def short_stream(stub: pb_grpc.TextToSpeechStub, voice_id: str, text: str = "Hi there.") -> Collected:
    requests = iter([pb.StreamRequest(config=greedy(voice_id, SHORT_FRAMES)), pb.StreamRequest(text=text)])
    return collect(stub.StreamSynthesize(requests, timeout=120))


class LiveSampler:
    """Polls the engine's live-session count on a thread; ``peak`` is the highest seen."""

    def __init__(self, engine: Engine, interval: float = 0.001) -> None:
        self.engine, self.interval, self.peak = engine, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.engine.live_sessions)
            time.sleep(self.interval)

    def __enter__(self) -> LiveSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture(scope="module")
def wav(speech_wav: Callable[..., bytes]) -> bytes:
    return speech_wav(1.2)


def _voice(srv: ServerThread, wav: bytes) -> str:
    with grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.TextToSpeechStub(ch)
        return stub.CreateVoice(pb.CreateVoiceRequest(ref_audio=wav, x_vector_only=True)).voice_id


# --------------------------------------------------------------------------- the session limit


@pytest.fixture(scope="module")
def limited(
    tiny_loaded: Callable[..., Checkpoint], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    srv = start_server(tiny_loaded("base", 0), tmp_path_factory.mktemp("voices"), max_sessions=LIMIT)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def limited_voice(limited: ServerThread, wav: bytes) -> str:
    return _voice(limited, wav)


def _burst(stub: pb_grpc.TextToSpeechStub, voice_id: str, n: int) -> tuple[Counter[str], list[str], int]:
    """``n`` short streams started together: (status codes, RESOURCE_EXHAUSTED details,
    streams that were admitted but came back incomplete)."""
    codes: Counter[str] = Counter()
    details: list[str] = []
    broken = [0]
    lock = threading.Lock()
    start = threading.Barrier(n)

    def one() -> None:
        start.wait()
        try:
            got = short_stream(stub, voice_id)
            ok = [d.frames for d in got.dones] == [SHORT_FRAMES - 1] and len(got.pcm(0)) == (
                SHORT_FRAMES - 1
            ) * SAMPLES_PER_FRAME
            with lock:
                codes["OK"] += 1
                broken[0] += not ok
        except grpc.RpcError as e:
            with lock:
                codes[e.code().name] += 1
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    details.append(e.details())

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return codes, details, broken[0]


def test_session_limit_holds_under_bursts(limited: ServerThread, limited_voice: str) -> None:
    engine = engine_of(limited)
    assert limited.metrics_port is not None
    with grpc.insecure_channel(limited.address) as ch:
        stub = pb_grpc.TextToSpeechStub(ch)
        with LiveSampler(engine) as sampler:
            # LIMIT streams held open: a burst above the limit is refused, every one of it
            held = []
            for _ in range(LIMIT):
                call = BidiCall(stub).send(config=greedy(limited_voice, 3000)).text("Hold the line, please.")
                next(iter(call))  # open and speaking
                held.append(call)
            full, details, _ = _burst(stub, limited_voice, 2 * LIMIT)
            assert full == Counter({"RESOURCE_EXHAUSTED": 2 * LIMIT}), full
            assert all("max_sessions" in d and str(LIMIT) in d for d in details), details
            assert (
                sample(scrape(limited.metrics_port), "qwen3tts_live_sessions", "qwen3tts_live_sessions")
                == LIMIT
            )

            # one closes: new streams are admitted again (one at a time, into the freed slot)
            released = held.pop()
            released.cancel()
            released.close()
            assert wait_for(lambda: engine.live_sessions == LIMIT - 1)
            one_free, _, broken = _burst(stub, limited_voice, 2 * LIMIT)
            assert set(one_free) <= {"OK", "RESOURCE_EXHAUSTED"} and one_free["OK"] >= 1, one_free
            assert broken == 0
            for call in held:
                call.cancel()
                call.close()
            assert wait_for(lambda: idle(limited), timeout=10)

            # bursts of 3x the limit with nothing held: admitted streams speak in full, the
            # rest are refused; the live count never passes the limit
            rounds, per_round = 6, 3 * LIMIT
            total: Counter[str] = Counter()
            for _ in range(rounds):
                codes, details, broken = _burst(stub, limited_voice, per_round)
                assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
                assert codes["OK"] >= 1 and broken == 0
                assert all("max_sessions" in d for d in details), details
                total += codes
        assert sampler.peak <= LIMIT, sampler.peak
        assert wait_for(lambda: idle(limited), timeout=10)
    record(
        "load",
        f"max_sessions={LIMIT}: {LIMIT} held + bursts of {2 * LIMIT}, then {rounds} bursts of {per_round}",
        refused_while_full=f"{full['RESOURCE_EXHAUSTED']}/{2 * LIMIT} RESOURCE_EXHAUSTED (names max_sessions)",
        one_slot_free=", ".join(f"{k} {v}" for k, v in sorted(one_free.items())),
        bursts=", ".join(f"{k} {v}" for k, v in sorted(total.items())),
        incomplete_admitted=0,
        peak_live_sessions=sampler.peak,
        limit=LIMIT,
    )


# --------------------------------------------------------------------------- bounded output backlog


SLOW_CLIENT = [("grpc.http2.bdp_probe", 0)]  # a fixed 64 KiB receive window: unread audio backs up


def _backlog(engine: Engine) -> int:
    return max((len(s.out) for s in list(engine.table.sessions.values())), default=0)


def _unread_backlog(
    srv: ServerThread, voice_id: str, seconds: float, until: int | None = None
) -> tuple[int, float, Collected]:
    """A stream with a long text whose client reads one response, then nothing for
    ``seconds`` (or until the backlog reaches ``until``): the peak of its server-side output
    backlog, how long the client did not read, and what it got once it read."""
    engine = engine_of(srv)
    with grpc.insecure_channel(srv.address, options=SLOW_CLIENT) as ch:
        call = (
            BidiCall(pb_grpc.TextToSpeechStub(ch)).send(config=greedy(voice_id, 2000)).text(LONG_TEXT).close()
        )
        responses = iter(call)
        first = next(responses)
        peak = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds and (until is None or peak < until):
            peak = max(peak, _backlog(engine))
            time.sleep(0.01)
        paused = time.monotonic() - t0
        got = collect(itertools.chain([first], responses))
    return peak, paused, got


@pytest.fixture(scope="module")
def backpressure_server(
    tiny_loaded: Callable[..., Checkpoint], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    # packets of one frame each: the backlog is counted in packets
    srv = start_server(
        tiny_loaded("base", 0), tmp_path_factory.mktemp("voices"), max_sessions=LIMIT, packet_policy="fixed"
    )
    yield srv
    srv.stop()


def test_unread_output_backlog_stays_bounded(backpressure_server: ServerThread, wav: bytes) -> None:
    """With ``max_buffered_packets=8`` a client that stops reading holds at most ~8 packets
    on the server (without the limit the same client's backlog grows past 3x that); another
    client is served meanwhile; once the slow one reads, its audio arrives complete and
    equal to a fully read stream's."""
    srv = backpressure_server
    assert hasattr(engine_of(srv).config, "max_buffered_packets"), (
        "the engine has no output backpressure limit"
    )
    vid = _voice(srv, wav)
    limit = 8
    with grpc.insecure_channel(srv.address) as ch:
        want = collect(
            pb_grpc.TextToSpeechStub(ch).StreamSynthesize(
                iter([pb.StreamRequest(config=greedy(vid, 2000)), pb.StreamRequest(text=LONG_TEXT)]),
                timeout=120,
            )
        )
    frames = want.dones[0].frames
    assert frames > 60  # long enough to back up: ~17 packets fit the window, 25 more are needed

    set_engine_limits(srv, max_buffered_packets=10**6)  # control: no limit, until it passes 3x
    unbounded, control_s, _ = _unread_backlog(srv, vid, 10.0, until=3 * limit + 1)
    assert wait_for(lambda: idle(srv), timeout=10)

    set_engine_limits(srv, max_buffered_packets=limit)
    other: list[Collected] = []
    with grpc.insecure_channel(srv.address) as ch2:
        stub2 = pb_grpc.TextToSpeechStub(ch2)
        t = threading.Thread(target=lambda: other.append(short_stream(stub2, vid)), daemon=True)
        timer = threading.Timer(0.5, t.start)  # starts while the slow client is not reading
        timer.start()
        bounded, paused, got = _unread_backlog(srv, vid, max(2.0, 1.5 * control_s))
        timer.join()
        t.join(30)
    assert wait_for(lambda: idle(srv), timeout=10)
    print(
        f"\nunread backlog: {unbounded} messages after {control_s:.1f} s without the limit, "
        f"{bounded} after {paused:.1f} s with max_buffered_packets={limit}"
    )
    assert unbounded > 3 * limit, unbounded  # the scenario does back up
    assert bounded <= limit + 2, bounded  # + the utterance's end and the session's close
    assert other and [d.frames for d in other[0].dones] == [SHORT_FRAMES - 1]
    assert [d.frames for d in got.dones] == [frames]
    # to rounding: batched decoding (the other client) rounds differently from decoding alone
    np.testing.assert_allclose(got.pcm(0), want.pcm(0), atol=PCM_TOLERANCE, rtol=0)
    record(
        "load",
        "client stops reading (long text, 64 KiB receive window)",
        backlog_without_limit=f"{unbounded} after {control_s:.1f} s",
        backlog_with_limit=f"{bounded} after {paused:.1f} s",
        max_buffered_packets=limit,
        other_client="served meanwhile",
        audio_after_reading=f"complete ({frames} frames), equal to a fully read stream",
    )


def test_pending_utterances_are_bounded(backpressure_server: ServerThread, wav: bytes) -> None:
    """Flushes queue utterances behind the one speaking; past ``max_pending_utterances``
    the stream ends with RESOURCE_EXHAUSTED naming the setting (and frees its session);
    within it, every utterance is spoken."""
    srv = backpressure_server
    assert hasattr(engine_of(srv).config, "max_pending_utterances"), "the engine has no utterance queue limit"
    vid = _voice(srv, wav)
    limit = 4
    set_engine_limits(srv, max_pending_utterances=limit)
    with grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.TextToSpeechStub(ch)
        within = BidiCall(stub).send(config=greedy(vid, 30))
        for i in range(limit - 1):  # limit - 1 flushes: limit utterances, the last empty
            within.text(f"Sentence number {i}.").flush(f"u{i}")
        got = collect(within.close())
        assert [d.client_id for d in got.dones] == [f"u{i}" for i in range(limit - 1)]
        assert all(len(got.pcm(i)) == 29 * SAMPLES_PER_FRAME for i in range(limit - 1))

        over = BidiCall(stub).send(config=greedy(vid, 3000))
        for i in range(3 * limit):
            over.text(f"Sentence number {i} goes on and on.").flush(f"u{i}")
        err = rpc_error(lambda: collect(over))
        over.close()
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
        assert "max_pending_utterances" in err.details() and str(limit) in err.details(), err.details()
    assert wait_for(lambda: idle(srv), timeout=10)
    record(
        "load",
        f"{3 * limit} flushes queued on one stream, max_pending_utterances={limit}",
        code=err.code().name,
        message=err.details(),
        within_limit=f"{limit - 1} utterances spoken in full",
    )


# --------------------------------------------------------------------------- many short streams


@pytest.fixture(scope="module")
def big(
    tiny_loaded: Callable[..., Checkpoint], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    srv = start_server(tiny_loaded("base", 0), tmp_path_factory.mktemp("voices"), max_sessions=BIG)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def big_voice(big: ServerThread, wav: bytes) -> str:
    return _voice(big, wav)


def _first_audio_ms(stub: pb_grpc.TextToSpeechStub, voice_id: str) -> tuple[float, Collected]:
    t0 = time.perf_counter()
    first: list[float] = []

    def on(r: pb.StreamResponse) -> None:
        if not first and r.WhichOneof("response") == "audio":
            first.append((time.perf_counter() - t0) * 1000)

    requests = iter(
        [pb.StreamRequest(config=greedy(voice_id, SHORT_FRAMES)), pb.StreamRequest(text="Hi there.")]
    )
    got = collect(stub.StreamSynthesize(requests, timeout=120), on)
    return (first[0] if first else float("nan")), got


PCM_TOLERANCE = 2  # int16 steps: batched decoding rounds differently from decoding alone (~1 LSB)


def _intact(got: Collected, want: Collected) -> bool:
    """All frames, and the samples of the same request decoded alone (to rounding)."""
    a, b = got.pcm(0).astype(np.int32), want.pcm(0).astype(np.int32)
    return (
        [d.frames for d in got.dones] == [SHORT_FRAMES - 1]
        and a.shape == b.shape
        and int(np.abs(a - b).max(initial=0)) <= PCM_TOLERANCE
    )


def _pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(xs, q)), 1)


@pytest.mark.parametrize(
    "n", [pytest.param(50, id="50"), pytest.param(1000, id="1000", marks=pytest.mark.soak)]
)
def test_sequential_short_streams(big: ServerThread, big_voice: str, n: int) -> None:
    warmup = max(10, n // 10)
    errors: list[str] = []
    latencies: list[float] = []
    with grpc.insecure_channel(big.address) as ch:
        stub = pb_grpc.TextToSpeechStub(ch)
        want = short_stream(stub, big_voice)
        rss0 = 0.0
        t0 = time.monotonic()
        for i in range(n):
            if i == warmup:
                rss0 = rss_mb()
            try:
                ms, got = _first_audio_ms(stub, big_voice)
                latencies.append(ms)
                if not _intact(got, want):
                    errors.append(
                        f"stream {i}: incomplete or different audio {[d.frames for d in got.dones]}"
                    )
            except grpc.RpcError as e:
                errors.append(f"stream {i}: {e.code().name} {e.details()}")
        elapsed = time.monotonic() - t0
    assert wait_for(lambda: idle(big), timeout=10)
    growth = rss_mb() - rss0
    record(
        "load",
        f"{n} sequential short streams (3 frames each)",
        streams=n,
        errors=len(errors),
        p50_first_packet_ms=_pct(latencies, 50),
        p99_first_packet_ms=_pct(latencies, 99),
        streams_per_s=round(n / elapsed, 1),
        rss_growth_mb=round(growth, 1),
        warmup_streams=warmup,
    )
    print(
        f"\n{n} sequential: {n / elapsed:.1f}/s, first packet p50 {_pct(latencies, 50)} ms, "
        f"RSS growth after {warmup} warm-up streams {growth:+.1f} MB"
    )
    assert not errors, errors[:10]
    assert growth < RSS_TARGET_MB


@pytest.mark.parametrize(
    "n", [pytest.param(20, id="20"), pytest.param(200, id="200", marks=pytest.mark.soak)]
)
def test_concurrent_short_streams(big: ServerThread, big_voice: str, n: int) -> None:
    """``n`` short streams at once, four rounds: two warm up (native caches of grpc and torch
    were still filling after one), RSS growth is measured over the other two."""
    assert n <= BIG
    errors: list[str] = []
    latencies: list[float] = []
    lock = threading.Lock()
    with grpc.insecure_channel(big.address) as ch:
        stub = pb_grpc.TextToSpeechStub(ch)
        want = short_stream(stub, big_voice)

        def one(start: threading.Barrier, tag: str) -> None:
            start.wait()
            try:
                ms, got = _first_audio_ms(stub, big_voice)
                with lock:
                    latencies.append(ms)
                    if not _intact(got, want):
                        errors.append(f"{tag}: incomplete or different audio {[d.frames for d in got.dones]}")
            except grpc.RpcError as e:
                with lock:
                    errors.append(f"{tag}: {e.code().name} {e.details()}")

        def round_(r: int) -> float:
            start = threading.Barrier(n)
            threads = [threading.Thread(target=one, args=(start, f"round {r} stream {i}")) for i in range(n)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            return time.monotonic() - t0

        with LiveSampler(engine_of(big), interval=0.005) as sampler:
            for r in range(WARMUP_ROUNDS):
                round_(r)
            rss0 = rss_mb()
            walls = [round_(r) for r in range(WARMUP_ROUNDS, WARMUP_ROUNDS + 2)]
    assert wait_for(lambda: idle(big), timeout=10)
    growth = rss_mb() - rss0
    record(
        "load",
        f"{n} concurrent short streams (3 frames each), {WARMUP_ROUNDS + 2} rounds",
        streams=(WARMUP_ROUNDS + 2) * n,
        errors=len(errors),
        peak_live_sessions=sampler.peak,
        p50_first_packet_ms=_pct(latencies, 50),
        p99_first_packet_ms=_pct(latencies, 99),
        round_s=round(float(np.mean(walls)), 2),
        rss_growth_mb=round(growth, 1),
    )
    print(
        f"\n{n} concurrent x{WARMUP_ROUNDS + 2}: round {np.mean(walls):.2f} s, peak live {sampler.peak}, first packet p50 "
        f"{_pct(latencies, 50)} ms p99 {_pct(latencies, 99)} ms, RSS growth {growth:+.1f} MB"
    )
    assert not errors, errors[:10]
    assert sampler.peak <= n
    assert growth < RSS_TARGET_MB
