"""Cheap requests that must not cost the server much (issue 14): health watches that would
fill ``max_concurrent_rpcs``, a 12 kB FLAC that declares gigabytes of samples, values echoed
whole into status messages past gRPC's metadata limit, and clients that disconnect while
audio is being written (a normal event: nothing may be logged at ERROR)."""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qwen3tts_rt.audio import ReferenceAudioRules
from qwen3tts_rt.model.checkpoint import Checkpoint
from qwen3tts_rt.server.app import ServerThread
from qwen3tts_rt.server.config import ServerConfig
from qwen3tts_rt.server.errors import MAX_STATUS_MESSAGE_BYTES, bounded, echo
from qwen3tts_rt.server.interceptors import ClientGoneInterceptor, MetricsInterceptor
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc
from tests.reliability import record
from tests.server_helpers import BidiCall, rpc_error, start_server, wait_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parent.parent
TOKEN = "dos-token"
GOOD = [("authorization", f"Bearer {TOKEN}")]
GRPC_LIMIT = "Concurrent RPC limit exceeded!"  # grpcio's refusal past maximum_concurrent_rpcs
MiB = 2**20
SYNTHETIC_CANCELS = 200
DISCONNECTS, WAVE = 60, 12


@pytest.fixture(scope="module")
def ckpt(tiny_loaded: Callable[..., Checkpoint]) -> Checkpoint:
    return tiny_loaded("custom_voice", 0)


@pytest.fixture(scope="module")
def server(ckpt: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    srv = start_server(ckpt, tmp_path_factory.mktemp("dos-voices"), warmup=False)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


# --------------------------------------------------------------------------- health watches


def test_health_watches_cannot_exhaust_the_server(ckpt: Checkpoint, tmp_path: Path) -> None:
    """More watch streams than ``max_concurrent_rpcs`` (no token needed for them): only
    ``max_health_watches`` are admitted, and an authenticated call and a health Check
    still succeed."""
    srv = start_server(
        ckpt,
        tmp_path / "voices",
        warmup=False,
        auth_token=TOKEN,
        max_concurrent_rpcs=8,
        max_unauthenticated_rpcs=4,
        max_health_watches=2,
    )
    try:
        with grpc.insecure_channel(srv.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=60) for _ in range(12)]
            outcomes: list[str] = []
            for w in watches:
                try:
                    assert next(w).status == health_pb2.HealthCheckResponse.SERVING
                    outcomes.append("open")
                except grpc.RpcError as e:
                    outcomes.append(e.code().name)
                    # refused by the watch bound, or, when more of the 12 arrive before the
                    # refused ones have ended (a loaded host), by gRPC's own max_concurrent_rpcs
                    assert "max_health_watches=2" in e.details() or e.details() == GRPC_LIMIT, e.details()
            assert outcomes.count("open") == 2, outcomes
            assert outcomes.count("RESOURCE_EXHAUSTED") == 10, outcomes
            stub = pb_grpc.TextToSpeechStub(ch)
            for _ in range(3):  # sequential calls: each needs a slot of max_concurrent_rpcs
                assert stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=GOOD, timeout=10).model_kind
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                assert status == health_pb2.HealthCheckResponse.SERVING
            for w in watches:
                w.cancel()
            assert wait_for(lambda: srv.server.unauthenticated.calls == 0, 10)
            again = health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
            assert next(again).status == health_pb2.HealthCheckResponse.SERVING  # the slots came back
            again.cancel()
    finally:
        srv.stop()
    record(
        "denial of service",
        "12 health Watch streams, max_concurrent_rpcs=8, max_health_watches=2",
        admitted=outcomes.count("open"),
        refused=outcomes.count("RESOURCE_EXHAUSTED"),
        authenticated_call="OK",
        health_check="SERVING",
    )


def test_unauthenticated_bound_keeps_half_of_the_capacity() -> None:
    assert ServerConfig().unauthenticated_bounds == (32, 8)
    assert ServerConfig(max_concurrent_rpcs=2).unauthenticated_bounds == (1, 1)
    assert ServerConfig(max_concurrent_rpcs=10, max_health_watches=0).unauthenticated_bounds == (5, 0)
    with pytest.raises(ValueError, match="max_health_watches"):
        ServerConfig(max_unauthenticated_rpcs=4, max_health_watches=5).validated()
    with pytest.raises(ValueError, match="max_unauthenticated_rpcs"):
        ServerConfig(max_unauthenticated_rpcs=0, max_health_watches=0).validated()


# --------------------------------------------------------------------------- memory of tiny uploads


def _crc8(data: bytes) -> int:
    crc = 0
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _crc16(data: bytes) -> int:
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def _utf8_number(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    assert n < 0x800
    return bytes([0xC0 | n >> 6, 0x80 | n & 0x3F])


def constant_flac(rate: int, channels: int, seconds: float, value: int = 1000) -> bytes:
    """A valid FLAC file of 16-bit samples that all equal ``value``: a STREAMINFO block,
    then frames of 65,535 samples made of CONSTANT subframes (3 bytes per channel), so that
    59 s at 384 kHz in 8 channels takes 12 kB. The frames take their rate from STREAMINFO,
    which allows any rate up to 1,048,575 Hz."""
    block = 65535
    total = int(rate * seconds)
    info = struct.pack(">HH", block, block) + b"\0" * 6  # block sizes; frame sizes unknown
    info += ((rate << 44) | ((channels - 1) << 41) | (15 << 36) | total).to_bytes(8, "big")
    info += b"\0" * 16  # MD5 unknown
    out = bytearray(b"fLaC" + bytes([0x80, 0, 0, len(info)]) + info)  # last (only) metadata block
    for i, start in enumerate(range(0, total, block)):
        n = min(block, total - start)
        # sync + fixed blocking; block size in 16 bits at the end; rate from STREAMINFO;
        # independent channels; 16-bit samples; frame number; block size - 1; CRC-8
        head = bytes([0xFF, 0xF8, 0x70, (channels - 1) << 4 | 0x4 << 1]) + _utf8_number(i)
        head += struct.pack(">H", n - 1)
        head += bytes([_crc8(head)])
        frame = head + (b"\x00" + struct.pack(">h", value)) * channels  # CONSTANT subframes
        out += frame + struct.pack(">H", _crc16(frame))
    return bytes(out)


_PEAK = """
import json, sys
from qwen3tts_rt.audio import ReferenceAudioRules, load_reference_audio

def status_mib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024

data = sys.stdin.buffer.read()
rules = ReferenceAudioRules(**json.loads(sys.argv[1]))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak resident size (VmHWM) starts again from the current one
before = status_mib("VmRSS")
try:
    ref = load_reference_audio(data, rules=rules, allow_paths=False)
    outcome = f"accepted {ref.duration_s:.1f} s"
except Exception as e:
    outcome = f"{type(e).__name__}: {e}"
print(json.dumps({"outcome": outcome, "peak_growth_mib": status_mib("VmHWM") - before}))
"""


def peak_of_loading(data: bytes, **rules: Any) -> tuple[str, float]:
    """(outcome, peak resident-memory growth in MiB) of ``load_reference_audio(data)`` in a
    fresh interpreter: VmHWM after loading minus VmRSS before (the high-water mark is reset
    first; ``ru_maxrss`` would not do: a child inherits its parent's)."""
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK, json.dumps(rules)],
        input=data,
        capture_output=True,
        cwd=REPO,
        timeout=120,
        check=True,
    )
    row = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return str(row["outcome"]), float(row["peak_growth_mib"])


def test_the_crafted_flac_declares_what_it_says() -> None:
    import io

    import av

    data = constant_flac(384_000, 8, 59.0)
    assert len(data) < 13_000
    with av.open(io.BytesIO(data), mode="r", format="flac") as c:
        s = c.streams.audio[0]
        assert (s.codec_context.sample_rate, s.codec_context.channels) == (384_000, 8)
        assert c.duration == 59_000_000
        frame = next(c.decode(s))
        assert (frame.sample_rate, frame.samples, len(frame.layout.channels)) == (384_000, 65535, 8)


DECODE_CASES = [
    # (name, rate, channels, seconds, rules, outcome fragment, peak bound MiB)
    ("384kHz-8ch-59s", 384_000, 8, 59.0, {}, "AudioSampleRateError: ref_audio: reference audio is 384000 Hz", 32),
    ("1MHz-2ch-59s", 1_048_575, 2, 59.0, {}, "at most 192000 Hz", 32),
    ("192kHz-8ch-59s", 192_000, 8, 59.0, {}, "AudioTooLargeError: ref_audio: reference audio decodes to more than 64 MiB", 2 * 64 + 48),
    ("192kHz-8ch-59s-16MiB", 192_000, 8, 59.0, {"max_decoded_bytes": 16 * MiB}, "more than 16 MiB", 2 * 16 + 48),
    ("48kHz-8ch-max2", 48_000, 8, 30.0, {"max_channels": 2}, "has 8 channels; at most 2", 32),
    ("48kHz-2ch-20s-accepted", 48_000, 2, 20.0, {}, "accepted 20.0 s", 2 * 20 * 48_000 * 2 * 4 / MiB + 48),
]  # fmt: skip


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures VmHWM in Linux /proc")
@pytest.mark.parametrize(
    ("rate", "channels", "seconds", "rules", "fragment", "bound_mib"),
    [c[1:] for c in DECODE_CASES],
    ids=[c[0] for c in DECODE_CASES],
)
def test_decoding_allocates_a_bounded_amount(
    rate: int, channels: int, seconds: float, rules: dict[str, Any], fragment: str, bound_mib: float
) -> None:
    """Tiny FLAC files that declare huge rates, many channels and a long duration: decoding
    them is refused from the header, or stopped at ``max_decoded_bytes``; the peak memory of
    loading one stays within twice that limit (decoded parts + their concatenation)."""
    data = constant_flac(rate, channels, seconds)
    outcome, peak = peak_of_loading(data, **rules)
    assert fragment in outcome, outcome
    assert peak < bound_mib, (
        f"{rate} Hz x {channels} ch x {seconds:g} s: peak grew {peak:.0f} MiB ({outcome})"
    )
    record(
        "memory amplification",
        f"FLAC of {len(data)} bytes declaring {rate} Hz, {channels} ch, {seconds:g} s",
        rules=rules or "defaults",
        outcome=outcome[:160],
        peak_growth_mib=round(peak, 1),
        bound_mib=round(bound_mib, 1),
    )


def test_a_tiny_flac_is_refused_over_grpc_at_once(
    tiny_loaded: Callable[..., Checkpoint], tmp_path: Path
) -> None:
    """The 12 kB FLAC as CreateVoice's reference audio: INVALID_ARGUMENT naming the rate."""
    srv = start_server(tiny_loaded("base", 0), tmp_path / "voices", warmup=False)
    data = constant_flac(384_000, 8, 59.0)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.TextToSpeechStub(ch)
            t0 = time.monotonic()
            err = rpc_error(
                lambda: stub.CreateVoice(
                    pb.CreateVoiceRequest(ref_audio=data, x_vector_only=True), timeout=60
                )
            )
            took = time.monotonic() - t0
    finally:
        srv.stop()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert "384000 Hz" in err.details() and "192000" in err.details()
    record("memory amplification", "CreateVoice with the 12 kB FLAC (384 kHz, 8 ch, 59 s)",
           code=err.code().name, message=err.details(), seconds=round(took, 3))  # fmt: skip


def test_reference_audio_limits_are_validated() -> None:
    assert ReferenceAudioRules().max_sample_rate >= 48_000
    with pytest.raises(ValueError, match="max_decoded_bytes"):
        ServerConfig(ref_audio=ReferenceAudioRules(max_decoded_bytes=0)).validated()
    with pytest.raises(ValueError, match="max_sample_rate"):
        ServerConfig(ref_audio=ReferenceAudioRules(max_sample_rate=16_000)).validated()


# --------------------------------------------------------------------------- echoed values


def _short_invalid(err: grpc.RpcError, field: str) -> str:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), (err.details() or "")[:200])
    details = err.details()
    assert len(details.encode()) <= MAX_STATUS_MESSAGE_BYTES, len(details.encode())
    assert details.startswith(field) or field in details[:80], details[:200]
    return str(details)


def _stream_error(stub: pb_grpc.TextToSpeechStub, cfg: pb.StreamConfig) -> grpc.RpcError:
    def run() -> None:
        for _ in stub.StreamSynthesize(iter([pb.StreamRequest(config=cfg), pb.StreamRequest(text="Hi.")])):
            pass

    return rpc_error(run)


@pytest.mark.parametrize("char", ["x", "é", "😀"])
def test_echoed_values_are_truncated(channel: grpc.Channel, ckpt: Checkpoint, char: str) -> None:
    """A 20,000-character language, speaker or Riva language_code: INVALID_ARGUMENT with a
    short message (not RESOURCE_EXHAUSTED for a status over gRPC's metadata limit)."""
    from riva.client.proto import riva_tts_pb2, riva_tts_pb2_grpc

    stub = pb_grpc.TextToSpeechStub(channel)
    speaker = ckpt.config.speakers[0]
    long = char * 20_000
    sampling = pb.SamplingParams(greedy=True, max_new_tokens=2)
    msgs = {
        "StreamSynthesize language": _short_invalid(
            _stream_error(stub, pb.StreamConfig(speaker=speaker, language=long, sampling=sampling)),
            "language",
        ),
        "StreamSynthesize speaker": _short_invalid(
            _stream_error(stub, pb.StreamConfig(speaker=long, sampling=sampling)), "speaker"
        ),
    }
    synth = pb.SynthesizeRequest(config=pb.StreamConfig(speaker=speaker, language=long), text="Hi.")
    msgs["Synthesize language"] = _short_invalid(
        rpc_error(lambda: list(stub.Synthesize(synth, timeout=30))), "language"
    )
    riva = riva_tts_pb2_grpc.RivaSpeechSynthesisStub(channel)
    req = riva_tts_pb2.SynthesizeSpeechRequest(text="Hi.", language_code=long, voice_name=speaker)
    msgs["Riva language_code"] = _short_invalid(
        rpc_error(lambda: riva.Synthesize(req, timeout=30)), "language_code"
    )
    for name, msg in msgs.items():
        record("denial of service", f"{name} of 20,000 x {char!r}", code="INVALID_ARGUMENT",
               message_bytes=len(msg.encode()), message=msg[:200])  # fmt: skip


def test_bounded_and_echo() -> None:
    short = "language: unknown language 'xx'; this model speaks: english"
    assert bounded(short) == short
    long = "language: unknown language '" + "é" * 20_000 + "'; this model speaks: english, chinese"
    cut = bounded(long)
    assert len(cut.encode()) <= MAX_STATUS_MESSAGE_BYTES
    assert cut.startswith("language: unknown language '")
    assert cut.endswith("this model speaks: english, chinese")
    assert "characters cut" in cut
    assert echo("abc") == "'abc'"
    assert echo("a\nb") == "'a\\nb'"
    e = echo("z" * 1000)
    assert len(e) < 100 and "1000 characters" in e


# --------------------------------------------------------------------------- disconnects


class _Records(logging.Handler):
    """Every record at ERROR or above, from any logger (grpc's included)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def error_records() -> Iterator[list[logging.LogRecord]]:
    handler = _Records()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.records
    finally:
        root.removeHandler(handler)


def _ident(b: bytes) -> bytes:
    return b


def test_writes_to_a_gone_client_are_not_errors(error_records: list[logging.LogRecord]) -> None:
    """grpc.aio alone logs ``ExecuteBatchError raised in core by servicer method`` at ERROR
    when a response write fails because the client left and the core reported the failed
    write before the client's cancel (without the fix: 30 of 200 and 31 of 500 cancels in two
    runs, no load needed). The server's interceptors end such a call as cancelled instead,
    quietly, and close the handler's generator at once."""
    message = b"x" * 1_000_000  # a write that waits on flow control when the client leaves
    written: list[int] = []

    async def endless(request: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            while True:
                yield message
        finally:
            written.append(1)  # the generator was closed (its cleanup ran)

    async def main() -> None:
        server = grpc.aio.server(interceptors=[MetricsInterceptor(), ClientGoneInterceptor()])
        handler = grpc.unary_stream_rpc_method_handler(
            endless, request_deserializer=_ident, response_serializer=_ident
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("t.Dos", {"Endless": handler}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()

        def client() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                call = ch.unary_stream(
                    "/t.Dos/Endless", request_serializer=_ident, response_deserializer=_ident
                )
                for _ in range(SYNTHETIC_CANCELS):
                    responses = call(b"", timeout=30)
                    next(responses)
                    responses.cancel()

        await asyncio.to_thread(client)
        for _ in range(200):
            if len(written) == SYNTHETIC_CANCELS:
                break
            await asyncio.sleep(0.02)
        await server.stop(0)

    asyncio.run(main())
    errors = [f"{r.name}: {r.getMessage()[:120]}" for r in error_records]
    assert not errors, errors[:5]
    assert len(written) == SYNTHETIC_CANCELS  # every handler's cleanup ran
    record("denial of service", f"{SYNTHETIC_CANCELS} streams cancelled while a 1 MB write waits (synthetic handler)",
           error_records=len(errors))  # fmt: skip


def _live_sessions() -> float:
    from qwen3tts_rt import metrics

    return float(next(iter(metrics.LIVE_SESSIONS.collect())).samples[0].value)


def _busy() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def test_disconnects_mid_audio_log_nothing_at_error(
    server: ServerThread, ckpt: Checkpoint, error_records: list[logging.LogRecord]
) -> None:
    """Streams that stop reading mid-audio and then go away, cancelled or with their
    connection closed under them, while the server's writes wait on flow control and a CPU
    hog runs: no record at ERROR from any logger, and no RPC left in flight."""
    text = "This is a long sentence that keeps the tiny model talking for a while. " * 4
    cfg = pb.StreamConfig(
        speaker=ckpt.config.speakers[0],
        language="english",
        encoding=pb.FLOAT32_LE,
        sample_rate_hz=48000,  # 15 kB a frame: the flow-control window fills within a second
        sampling=pb.SamplingParams(greedy=True, max_new_tokens=400),
    )
    outcomes: list[str] = []
    hog = _busy()
    try:
        for wave in range(DISCONNECTS // WAVE):
            close_channel = wave % 2 == 1
            # without BDP probing the window stays at 64 kB: the server's writes wait on it
            ch = grpc.insecure_channel(server.address, options=[("grpc.http2.bdp_probe", 0)])
            stub = pb_grpc.TextToSpeechStub(ch)
            calls = [BidiCall(stub, timeout=60).send(config=cfg).text(text).flush() for _ in range(WAVE)]
            for call in calls:  # every stream is speaking; then the client stops reading
                assert next(r for r in call if r.WhichOneof("response") == "audio").audio.audio
            time.sleep(1.0)  # the server's writes back up against the unread streams
            if close_channel:
                ch.close()  # the connection goes away under all of them
            for call in calls:
                call.cancel()
                call.close()
                outcomes.append("connection closed" if close_channel else "cancelled")
            ch.close()
            assert wait_for(lambda: server.server.inflight.count == 0, 15), server.server.inflight.count
            assert wait_for(lambda: _live_sessions() == 0, 15), _live_sessions()  # freed at once
    finally:
        hog.kill()
        hog.wait()
    assert wait_for(lambda: server.server.inflight.count == 0, 15), server.server.inflight.count
    errors = [f"{r.name}: {r.getMessage()[:160]}" for r in error_records]
    assert not errors, errors[:5]
    record("denial of service", f"{DISCONNECTS} streams disconnected mid-audio, {WAVE} at a time, one CPU hog",
           cancelled=outcomes.count("cancelled"), connection_closed=outcomes.count("connection closed"),
           error_records=len(errors))  # fmt: skip
