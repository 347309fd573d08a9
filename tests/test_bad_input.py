"""The bad-input corpus, driven through the real gRPC server (own API and Riva API).

Every case is a named input sent to one API; it must end with the status the rule calls
for, and a message that names the field and the rule (or succeed, where the rule is "this
input is fine", with what the voice notes say). A healthy stream runs in the background
the whole time and must finish normally each time; after the corpus, nothing has leaked
(engine sessions and slots, the live-sessions gauge) and no call ended INTERNAL/UNKNOWN.

Decisions recorded here (a production TTS must be consistent about them):
* stereo and higher-rate audio is down-mixed and resampled (notes say so);
* control characters (C0/C1 except tab and line breaks) become spaces: the audio equals
  that of the text with spaces there; text of only whitespace/control characters is
  "nothing to say": INVALID_ARGUMENT for one-shot calls, a silent utterance in a stream;
* mixed scripts are spoken;
* the content decides the audio format, never a declared type (Riva LINEAR_PCM holding
  an MP3 file is decoded as MP3).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from riva.client.proto import riva_audio_pb2 as riva_audio
from riva.client.proto import riva_tts_pb2 as rtts
from riva.client.proto import riva_tts_pb2_grpc as rtts_grpc

from qwen3tts_rt.model.checkpoint import Checkpoint, load_checkpoint
from qwen3tts_rt.server.app import ServerThread
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc
from tests import badinput
from tests.reliability import record
from tests.server_helpers import Collected, collect, sample, scrape, start_server, wait_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_SESSIONS = 4
MAX_NEW_TOKENS = 6  # every utterance stops after a few frames (greedy, random weights)
TEXT = "Hi there."
SECTION = "bad input"


# --------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    """The tiny Base checkpoint with greedy, short defaults: Riva clients cannot ask for
    either, and every synthesis in the corpus should take a few frames."""
    src = tiny_checkpoint("base", 0)
    d = badinput.short_greedy_checkpoint(src, tmp_path_factory.mktemp("ckpt") / "base-short", MAX_NEW_TOKENS)
    return load_checkpoint(d)


@pytest.fixture(scope="module")
def server(ckpt: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    srv = start_server(ckpt, tmp_path_factory.mktemp("voices"), max_sessions=MAX_SESSIONS)
    yield srv
    srv.stop()


@dataclass
class Clients:
    srv: ServerThread
    tts: pb_grpc.TextToSpeechStub
    riva: rtts_grpc.RivaSpeechSynthesisStub
    voice_id: str
    channel: grpc.Channel
    bad_rpcs_before: float = 0.0  # INTERNAL + UNKNOWN RPCs of the process before the corpus

    @property
    def max_receive(self) -> int:
        return self.srv.server.config.max_receive_bytes


@pytest.fixture(scope="module")
def clients(server: ServerThread) -> Iterator[Clients]:
    with grpc.insecure_channel(server.address) as ch:
        tts = pb_grpc.TextToSpeechStub(ch)
        voice = tts.CreateVoice(
            pb.CreateVoiceRequest(ref_audio=badinput.audio("wav 24 kHz mono 1.5 s"), x_vector_only=True)
        )
        yield Clients(
            server, tts, rtts_grpc.RivaSpeechSynthesisStub(ch), voice.voice_id, ch, bad_rpcs(server)
        )


def bad_rpcs(server: ServerThread) -> float:
    """RPCs of this process that ended INTERNAL or UNKNOWN (the counter is process-wide)."""
    assert server.metrics_port is not None
    families = scrape(server.metrics_port)
    return sum(
        sample(families, "qwen3tts_rpcs", "qwen3tts_rpcs_total", code=k) for k in ("INTERNAL", "UNKNOWN")
    )


# --------------------------------------------------------------------------- the healthy neighbour


@dataclass
class Neighbour:
    """Short healthy streams, one after another, on their own channel, until stopped."""

    address: str
    voice_id: str
    done: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Neighbour:
        self._thread = threading.Thread(target=self._run, name="healthy-neighbour", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        cfg = pb.StreamConfig(
            voice_id=self.voice_id, sampling=pb.SamplingParams(greedy=True, max_new_tokens=4)
        )
        with grpc.insecure_channel(self.address) as ch:
            stub = pb_grpc.TextToSpeechStub(ch)
            while not self._stop.is_set():
                reqs = [pb.StreamRequest(config=cfg), pb.StreamRequest(text="Still here.")]
                try:
                    got = collect(stub.StreamSynthesize(iter(reqs), timeout=60))
                except grpc.RpcError as e:
                    self.failures.append(f"{e.code()}: {e.details()}")
                    continue
                if [d.utterance_id for d in got.dones] != [0] or not got.chunks:
                    self.failures.append(f"malformed stream: {len(got.chunks)} chunks, dones {got.dones}")
                self.done += 1

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(90)
        assert not self._thread.is_alive(), "the healthy stream hung"


@pytest.fixture(scope="module")
def neighbour(clients: Clients) -> Iterator[Neighbour]:
    n = Neighbour(clients.srv.address, clients.voice_id).start()
    yield n
    if n._thread is not None and n._thread.is_alive():
        n.stop()


# --------------------------------------------------------------------------- API drivers


@dataclass
class Outcome:
    code: grpc.StatusCode
    message: str = ""
    voice: pb.Voice | None = None
    stream: Collected | None = None
    audio: bytes = b""


def _call(fn: Callable[[], Outcome]) -> Outcome:
    try:
        return fn()
    except grpc.RpcError as e:
        return Outcome(e.code(), e.details() or "")


def short_config(c: Clients, **kw: Any) -> pb.StreamConfig:
    kw.setdefault("sampling", pb.SamplingParams(greedy=True, max_new_tokens=MAX_NEW_TOKENS))
    if not any(k in kw for k in ("voice_id", "speaker", "clone")):
        kw["voice_id"] = c.voice_id
    return pb.StreamConfig(**kw)


def stream(c: Clients, *requests: pb.StreamRequest) -> Outcome:
    def run() -> Outcome:
        got = collect(c.tts.StreamSynthesize(iter(requests), timeout=60))
        return Outcome(grpc.StatusCode.OK, stream=got, audio=b"".join(ch.audio for ch in got.chunks))

    return _call(run)


def synthesize(c: Clients, text: str, cfg: pb.StreamConfig | None = None) -> Outcome:
    def run() -> Outcome:
        packets = list(
            c.tts.Synthesize(pb.SynthesizeRequest(config=cfg or short_config(c), text=text), timeout=60)
        )
        return Outcome(grpc.StatusCode.OK, audio=b"".join(p.audio for p in packets))

    return _call(run)


def riva_request(c: Clients, text: str = TEXT, **kw: Any) -> rtts.SynthesizeSpeechRequest:
    kw.setdefault("language_code", "en-US")
    kw.setdefault("sample_rate_hz", 24000)
    kw.setdefault("encoding", riva_audio.LINEAR_PCM)
    if "zero_shot_data" not in kw:
        kw.setdefault("voice_name", f"Qwen3-TTS.{c.voice_id}")
    return rtts.SynthesizeSpeechRequest(text=text, **kw)


def riva(c: Clients, req: rtts.SynthesizeSpeechRequest) -> Outcome:
    return _call(lambda: Outcome(grpc.StatusCode.OK, audio=c.riva.Synthesize(req, timeout=60).audio))


def riva_online(c: Clients, *reqs: rtts.SynthesizeSpeechRequest) -> Outcome:
    def run() -> Outcome:
        audio = b"".join(r.audio for r in c.riva.SynthesizeOnline(iter(reqs), timeout=60))
        return Outcome(grpc.StatusCode.OK, audio=audio)

    return _call(run)


# --------------------------------------------------------------------------- the table


OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class Case:
    name: str
    api: str
    run: Callable[[Clients], Outcome]
    code: grpc.StatusCode
    words: tuple[str, ...] = ()  # in the message (errors) or the voice notes (CreateVoice)
    check: Callable[[Clients, Outcome], None] | None = None
    needs: tuple[str, ...] = ()  # PyAV encoders

    @property
    def id(self) -> str:
        return f"{self.api}: {self.name}"


# reference-audio inputs: (expected code, rule words); OK cases list words of the voice notes
AUDIO_RULES: dict[str, tuple[grpc.StatusCode, tuple[str, ...]]] = {
    "wav truncated": (INVALID, ("WAV is truncated", "announces", "complete file")),
    "wav header only": (INVALID, ("WAV has no sample data", "complete WAV")),
    "wav corrupt header (0 channels)": (INVALID, ("looks like WAV but could not be decoded", "valid file")),
    "mp3 truncated": (INVALID, ("MP3 is truncated", "Xing/Info header announces", "complete file")),
    "mp3 corrupt": (INVALID, ("looks like MP3 but could not be decoded", "valid file")),
    "m4a truncated": (INVALID, ("looks like M4A/MP4 (AAC) but could not be decoded", "complete")),
    "m4a corrupt": (INVALID, ("looks like M4A/MP4 (AAC) but could not be decoded", "valid file")),
    "flac damaged frame": (INVALID, ("FLAC is truncated or damaged", "header announces 4.00 s")),
    "m4a signature, mp3 inside": (INVALID, ("looks like M4A/MP4", "could not be decoded")),
    "mp3 signature, wav inside": (INVALID, ("looks like MP3", "could not be decoded")),
    "wav 8 kHz": (INVALID, ("8000 Hz", "at least 24000 Hz")),
    "mp3 16 kHz": (INVALID, ("16000 Hz", "at least 24000 Hz")),
    "wav stereo 48 kHz": (OK, ("down-mixed 2 channels to mono", "resampled 48000 Hz to 24000 Hz")),
    "mp3 stereo 48 kHz": (OK, ("down-mixed 2 channels to mono", "resampled 48000 Hz to 24000 Hz")),
    "m4a 24 kHz": (OK, ("10-20 s of clean speech clones best",)),
    "11 MB": (INVALID, ("10.5 MiB", "at most 10 MiB")),
    "61 s": (INVALID, ("longer than 60 s", "at most 60 s")),
    "0.2 s": (INVALID, ("0.20 s", "at least 1 s")),
    "all-zero": (INVALID, ("silent", "audible speech")),
    "NaN float wav": (INVALID, ("1 NaN or infinite sample", "finite")),
    "Inf float wav": (INVALID, ("NaN or infinite sample", "finite")),
    "empty bytes": (INVALID, ("empty",)),
}


def _clone(audio: bytes) -> pb.ClonePrompt:
    return pb.ClonePrompt(ref_audio=audio, x_vector_only=True)


def assert_close_pcm(a: bytes, b: bytes, why: str) -> None:
    """The same frames decoded: 16-bit samples equal within float noise (a batch-mate
    changes the reduction order); other frames would differ everywhere."""
    x, y = (np.frombuffer(v, dtype="<i2").astype(np.int32) for v in (a, b))
    assert x.size and x.shape == y.shape and int(np.abs(x - y).max()) <= 8, why


def _has_audio(c: Clients, out: Outcome) -> None:
    assert out.audio, "no audio"


def audio_cases() -> list[Case]:
    cases = []
    for name, (code, words) in AUDIO_RULES.items():
        needs = badinput.AUDIO[name][1]

        def create(c: Clients, name: str = name) -> Outcome:
            req = pb.CreateVoiceRequest(ref_audio=badinput.audio(name), x_vector_only=True)
            return _call(lambda: Outcome(OK, voice=c.tts.CreateVoice(req, timeout=60)))

        def clone_stream(c: Clients, name: str = name) -> Outcome:
            cfg = short_config(c, clone=_clone(badinput.audio(name)))
            return stream(c, pb.StreamRequest(config=cfg), pb.StreamRequest(text=TEXT))

        def clone_synth(c: Clients, name: str = name) -> Outcome:
            return synthesize(c, TEXT, short_config(c, clone=_clone(badinput.audio(name))))

        def zero_shot(c: Clients, name: str = name) -> Outcome:
            zs = rtts.ZeroShotData(audio_prompt=badinput.audio(name))
            return riva(c, riva_request(c, zero_shot_data=zs))

        def notes_say(c: Clients, out: Outcome, words: tuple[str, ...] = words) -> None:
            assert out.voice is not None
            for w in words:
                assert any(w in n for n in out.voice.notes), (w, list(out.voice.notes))

        err_words = words if code is not OK else ()
        cases.append(
            Case(
                name,
                "CreateVoice",
                create,
                code,
                ("ref_audio", *err_words),
                notes_say if code is OK else None,
                needs,
            )
        )
        stream_words = ("config.clone.ref_audio", *err_words)
        ok_check = _has_audio if code is OK else None
        cases.append(Case(name, "StreamSynthesize", clone_stream, code, stream_words, ok_check, needs))
        cases.append(Case(name, "Synthesize", clone_synth, code, stream_words, ok_check, needs))
        if name != "empty bytes":  # Riva: no audio_prompt means "no zero-shot voice"
            riva_words = ("zero_shot_data.audio_prompt", *err_words)
            cases.append(Case(name, "Riva.Synthesize", zero_shot, code, riva_words, ok_check, needs))

    def declared(encoding: int, name: str) -> Callable[[Clients], Outcome]:
        def run(c: Clients) -> Outcome:
            zs = rtts.ZeroShotData(audio_prompt=badinput.audio(name), encoding=encoding, sample_rate_hz=16000)
            return riva(c, riva_request(c, zero_shot_data=zs))

        return run

    def same_voice_as_undeclared(name: str) -> Callable[[Clients, Outcome], None]:
        def check(c: Clients, out: Outcome) -> None:
            plain = riva(
                c, riva_request(c, zero_shot_data=rtts.ZeroShotData(audio_prompt=badinput.audio(name)))
            )
            assert plain.code is OK
            assert_close_pcm(out.audio, plain.audio, "the declared encoding changed how the audio was read")

        return check

    # a declared type that does not match the content: the content decides
    for enc, name in (
        (riva_audio.LINEAR_PCM, "mp3 stereo 48 kHz"),
        (riva_audio.OGGOPUS, "wav stereo 48 kHz"),
    ):
        label = f"{name} declared {riva_audio.AudioEncoding.Name(enc)}"
        check = same_voice_as_undeclared(name)
        cases.append(
            Case(label, "Riva.Synthesize", declared(enc, name), OK, (), check, badinput.AUDIO[name][1])
        )
    cases.append(
        Case(
            "m4a truncated declared LINEAR_PCM",
            "Riva.Synthesize",
            declared(riva_audio.LINEAR_PCM, "m4a truncated"),
            INVALID,
            ("zero_shot_data.audio_prompt", "M4A/MP4 (AAC) but could not be decoded"),
            needs=("aac",),
        )
    )

    def long_transcript(c: Clients) -> Outcome:
        audio = badinput.audio("wav 24 kHz mono 1.5 s")
        req = pb.CreateVoiceRequest(ref_audio=audio, ref_text="Hello there. " * 80_000)
        return _call(lambda: Outcome(OK, voice=c.tts.CreateVoice(req, timeout=60)))

    cases.append(
        Case(
            "transcript of 1 MB", "CreateVoice", long_transcript, INVALID, ("ref_text", "max_ref_text_chars")
        )
    )
    return cases


# text inputs through the four text APIs
MEGABYTE = "Speak this sentence. " * (1024 * 1024 // 21 + 1)
CONTROL = "Hi\x00 there\x07,\x1b[31m friend\x7f\x9b."
CONTROL_AS_SPACES = "Hi  there , [31m friend  ."
MIXED = "Hello, 你好, Привет, مرحبا, こんにちは, שלום 🎉 café."


def _no_utterance(c: Clients, out: Outcome) -> None:
    assert out.stream is not None
    assert out.stream.dones == [] and out.stream.chunks == [], "an utterance with nothing to say spoke"


def _spoken(c: Clients, out: Outcome) -> None:
    assert out.stream is not None
    assert [d.utterance_id for d in out.stream.dones] == [0] and out.stream.chunks


def _control_spoken_as_spaces(c: Clients, out: Outcome) -> None:
    assert out.audio
    same = synthesize(c, CONTROL_AS_SPACES)
    assert same.code is OK
    assert_close_pcm(out.audio, same.audio, "control characters did not read as spaces")


def _online_silent(c: Clients, out: Outcome) -> None:
    assert out.audio == b""


def text_cases() -> list[Case]:
    def st(text: str) -> Callable[[Clients], Outcome]:
        return lambda c: stream(c, pb.StreamRequest(config=short_config(c)), pb.StreamRequest(text=text))

    def sy(text: str) -> Callable[[Clients], Outcome]:
        return lambda c: synthesize(c, text)

    def rv(text: str) -> Callable[[Clients], Outcome]:
        return lambda c: riva(c, riva_request(c, text))

    def ro(text: str) -> Callable[[Clients], Outcome]:
        return lambda c: riva_online(c, riva_request(c, text))

    empty = ("text", "is empty", "nothing to say")
    synth_limit = ("text", f"{len(MEGABYTE)} characters", "at most 20000", "max_synthesize_chars")
    return [
        Case("text of 0 bytes", "StreamSynthesize", st(""), OK, check=_no_utterance),
        Case("text of 0 bytes", "Synthesize", sy(""), INVALID, empty),
        Case("text of 0 bytes", "Riva.Synthesize", rv(""), INVALID, empty),
        Case("text of 0 bytes", "Riva.SynthesizeOnline", ro(""), OK, check=_online_silent),
        Case(
            "text of 1 MB",
            "StreamSynthesize",
            st(MEGABYTE),
            INVALID,
            ("text", "exceeds 20000 characters", "max_utterance_chars"),
        ),
        Case("text of 1 MB", "Synthesize", sy(MEGABYTE), INVALID, synth_limit),
        Case("text of 1 MB", "Riva.Synthesize", rv(MEGABYTE), INVALID, synth_limit),
        Case("text of 1 MB", "Riva.SynthesizeOnline", ro(MEGABYTE), INVALID, synth_limit),
        Case("only whitespace", "StreamSynthesize", st(" \t\n  \u3000\n"), OK, check=_no_utterance),
        Case("only whitespace", "Synthesize", sy(" \t\n  \u3000\n"), INVALID, empty),
        Case("only whitespace", "Riva.Synthesize", rv(" \t\n  \u3000\n"), INVALID, empty),
        Case("only whitespace", "Riva.SynthesizeOnline", ro(" \t\n "), OK, check=_online_silent),
        Case("only control characters", "StreamSynthesize", st("\x00\x01\x1b\x7f"), OK, check=_no_utterance),
        Case(
            "only control characters",
            "Synthesize",
            sy("\x00\x01\x1b\x7f"),
            INVALID,
            (*empty, "control characters"),
        ),
        Case(
            "only control characters",
            "Riva.Synthesize",
            rv("\x00\x1b"),
            INVALID,
            (*empty, "control characters"),
        ),
        Case("control characters", "StreamSynthesize", st(CONTROL), OK, check=_spoken),
        Case("control characters", "Synthesize", sy(CONTROL), OK, check=_control_spoken_as_spaces),
        Case("control characters", "Riva.Synthesize", rv(CONTROL), OK, check=_has_audio),
        Case("mixed scripts", "StreamSynthesize", st(MIXED), OK, check=_spoken),
        Case("mixed scripts", "Synthesize", sy(MIXED), OK, check=_has_audio),
        Case("mixed scripts", "Riva.Synthesize", rv(MIXED), OK, check=_has_audio),
        Case("mixed scripts", "Riva.SynthesizeOnline", ro(MIXED), OK, check=_has_audio),
    ]


def voice_and_sampling_cases() -> list[Case]:
    def cfg_case(name: str, words: tuple[str, ...], **kw: Any) -> list[Case]:
        def st(c: Clients) -> Outcome:
            return stream(c, pb.StreamRequest(config=short_config(c, **kw)), pb.StreamRequest(text=TEXT))

        def sy(c: Clients) -> Outcome:
            return synthesize(c, TEXT, short_config(c, **kw))

        return [
            Case(name, "StreamSynthesize", st, INVALID, words),
            Case(name, "Synthesize", sy, INVALID, words),
        ]

    def sp(**kw: Any) -> pb.SamplingParams:
        return pb.SamplingParams(greedy=True, **kw)

    nan, inf = float("nan"), float("inf")
    cases = [
        *cfg_case(
            "temperature NaN",
            ("config.sampling.temperature", "nan", "0 < temperature <= 10"),
            sampling=sp(temperature=nan),
        ),
        *cfg_case(
            "top_p infinite", ("config.sampling.top_p", "inf", "0 < top_p <= 1"), sampling=sp(top_p=inf)
        ),
        *cfg_case("top_k 10^9", ("config.sampling.top_k", "0 <= top_k <= 4096"), sampling=sp(top_k=10**9)),
        *cfg_case(
            "max_new_tokens 2^31-1",
            ("config.sampling.max_new_tokens", "<= 65536"),
            sampling=sp(max_new_tokens=2**31 - 1),
        ),
        *cfg_case(
            "repetition_penalty NaN",
            ("config.sampling.repetition_penalty", "0.5 <= repetition_penalty <= 2"),
            sampling=sp(repetition_penalty=nan),
        ),
        *cfg_case(
            "subtalker_temperature -1",
            ("config.sampling.subtalker_temperature", "0 < temperature"),
            sampling=sp(subtalker_temperature=-1),
        ),
        *cfg_case(
            "subtalker_top_k 5000",
            ("config.sampling.subtalker_top_k", "<= 4096"),
            sampling=sp(subtalker_top_k=5000),
        ),
        *cfg_case(
            "sample_rate_hz -8000",
            ("config.sample_rate_hz", "-8000 Hz is not supported", "48000"),
            sample_rate_hz=-8000,
        ),
        *cfg_case("unknown speaker on a Base model", ("config.speaker", "CustomVoice"), speaker="vivian"),
        *cfg_case(
            "instruct of 1 MB",
            ("config.instruct", f"has {len(MEGABYTE)} characters", "max_instruct_chars"),
            instruct=MEGABYTE,
        ),
        *cfg_case("unknown language", ("config.language", "unknown language 'xx'", "english"), language="xx"),
    ]

    def rv(**kw: Any) -> Callable[[Clients], Outcome]:
        return lambda c: riva(c, riva_request(c, **kw))

    cases += [
        Case(
            "unknown voice",
            "Riva.Synthesize",
            rv(voice_name="Qwen3-TTS.nobody"),
            INVALID,
            ("voice_name", "unknown voice 'nobody'"),
        ),
        Case(
            "unknown speaker",
            "Riva.Synthesize",
            rv(voice_name="vivian"),
            INVALID,
            ("voice_name", "unknown voice 'vivian'"),
        ),
        Case(
            "unknown language",
            "Riva.Synthesize",
            rv(language_code="xx-YY"),
            INVALID,
            ("language_code", "'xx-YY' is not a language", "en-US"),
        ),
        Case(
            "unsupported rate",
            "Riva.Synthesize",
            rv(sample_rate_hz=11000),
            INVALID,
            ("sample_rate_hz", "11000 Hz is not supported"),
        ),
        Case(
            "FLAC output",
            "Riva.Synthesize",
            rv(encoding=riva_audio.FLAC),
            INVALID,
            ("encoding", "FLAC is not supported", "LINEAR_PCM"),
        ),
        Case(
            "instruct of 1 MB",
            "Riva.Synthesize",
            rv(custom_configuration={"instruct": MEGABYTE}),
            INVALID,
            ("custom_configuration.instruct", "max_instruct_chars"),
        ),
        Case(
            "seed not an integer",
            "Riva.Synthesize",
            rv(custom_configuration={"seed": "x"}),
            INVALID,
            ("custom_configuration.seed", "integer"),
        ),
        Case(
            "raw PCM without a rate",
            "Riva.Synthesize",
            rv(zero_shot_data=rtts.ZeroShotData(audio_prompt=bytes(48000), encoding=riva_audio.LINEAR_PCM)),
            INVALID,
            ("zero_shot_data.sample_rate_hz", "sample rate"),
        ),
    ]
    return cases


def order_cases() -> list[Case]:
    def seq(*make: Callable[[Clients], pb.StreamRequest]) -> Callable[[Clients], Outcome]:
        return lambda c: stream(c, *(m(c) for m in make))

    def cfg(c: Clients) -> pb.StreamRequest:
        return pb.StreamRequest(config=short_config(c))

    def text(t: str) -> Callable[[Clients], pb.StreamRequest]:
        return lambda c: pb.StreamRequest(text=t)

    def flush(c: Clients) -> pb.StreamRequest:
        return pb.StreamRequest(flush=pb.Flush(client_id="f"))

    def cancel(c: Clients) -> pb.StreamRequest:
        return pb.StreamRequest(cancel=pb.Cancel())

    def after_cancel(c: Clients, out: Outcome) -> None:
        assert out.stream is not None
        dones = out.stream.dones
        assert dones and dones[-1].reason != pb.UtteranceDone.CANCELLED, dones
        assert [d.utterance_id for d in dones] == sorted(d.utterance_id for d in dones)
        assert {ch.utterance_id for ch in out.stream.chunks} <= {d.utterance_id for d in dones}

    def flushes_only(c: Clients, out: Outcome) -> None:
        assert out.stream is not None
        assert not out.stream.chunks and all(d.frames == 0 for d in out.stream.dones)

    once = ("config", "exactly once", "first message")
    return [
        Case(
            "flush before config",
            "StreamSynthesize",
            seq(flush, cfg),
            INVALID,
            ("config", "flush arrived before config"),
        ),
        Case(
            "cancel before config",
            "StreamSynthesize",
            seq(cancel, cfg),
            INVALID,
            ("config", "cancel arrived before config"),
        ),
        Case("config twice in a row", "StreamSynthesize", seq(cfg, cfg, text(TEXT)), INVALID, once),
        Case("config after cancel", "StreamSynthesize", seq(cfg, text(TEXT), cancel, cfg), INVALID, once),
        Case(
            "text after cancel",
            "StreamSynthesize",
            seq(cfg, text(TEXT), cancel, text("Again."), flush, text("More.")),
            OK,
            check=after_cancel,
        ),
        Case(
            "cancel twice, then text",
            "StreamSynthesize",
            seq(cfg, cancel, cancel, text(TEXT)),
            OK,
            check=after_cancel,
        ),
        Case(
            "flushes with no text", "StreamSynthesize", seq(cfg, flush, flush, flush), OK, check=flushes_only
        ),
        Case(
            "empty message after cancel",
            "StreamSynthesize",
            seq(cfg, text(TEXT), cancel, lambda c: pb.StreamRequest()),
            INVALID,
            ("request", "empty message", "set one of"),
        ),
    ]


def oversized_cases() -> list[Case]:
    words = ("larger than max",)

    def big(c: Clients) -> bytes:
        return bytes(c.max_receive + 1)

    def create(c: Clients) -> Outcome:
        return _call(
            lambda: Outcome(OK, voice=c.tts.CreateVoice(pb.CreateVoiceRequest(ref_audio=big(c)), timeout=60))
        )

    def delta(c: Clients) -> Outcome:
        return stream(
            c, pb.StreamRequest(config=short_config(c)), pb.StreamRequest(text="x" * (c.max_receive + 1))
        )

    def first(c: Clients) -> Outcome:
        return stream(
            c, pb.StreamRequest(config=short_config(c, clone=_clone(big(c)))), pb.StreamRequest(text=TEXT)
        )

    def synth(c: Clients) -> Outcome:
        return synthesize(c, "x" * (c.max_receive + 1))

    def rv(c: Clients) -> Outcome:
        return riva(c, riva_request(c, "x" * (c.max_receive + 1)))

    def ro(c: Clients) -> Outcome:
        return riva_online(c, riva_request(c, "Hello"), riva_request(c, "x" * (c.max_receive + 1)))

    return [
        Case("message over max_receive_bytes", "CreateVoice", create, EXHAUSTED, words),
        Case("config over max_receive_bytes", "StreamSynthesize", first, EXHAUSTED, words),
        Case("text delta over max_receive_bytes", "StreamSynthesize", delta, EXHAUSTED, words),
        Case("message over max_receive_bytes", "Synthesize", synth, EXHAUSTED, words),
        Case("message over max_receive_bytes", "Riva.Synthesize", rv, EXHAUSTED, words),
        Case("second message over max_receive_bytes", "Riva.SynthesizeOnline", ro, EXHAUSTED, words),
    ]


def _raw(c: Clients, kind: str, method: str, *messages: bytes) -> Outcome:
    """Send raw bytes as the request(s) of ``method`` (what a broken client could send)."""
    ident: Callable[[bytes], bytes] = lambda b: b  # noqa: E731
    ch = c.channel
    if kind == "unary_unary":
        return _call(lambda: Outcome(OK, audio=ch.unary_unary(method, ident, ident)(messages[0], timeout=60)))
    if kind == "unary_stream":
        return _call(
            lambda: Outcome(
                OK, audio=b"".join(ch.unary_stream(method, ident, ident)(messages[0], timeout=60))
            )
        )
    return _call(
        lambda: Outcome(
            OK, audio=b"".join(ch.stream_stream(method, ident, ident)(iter(messages), timeout=60))
        )
    )


BAD_UTF8 = b"\xff\xfe\x80"


def _string_field(number: int, value: bytes) -> bytes:
    """A length-delimited protobuf field (strings, bytes, messages) written by hand."""
    return bytes([number << 3 | 2, len(value)]) + value


def undecodable_cases() -> list[Case]:
    tts = "/qwen3tts_rt.v1.TextToSpeech/"
    riva_svc = "/nvidia.riva.tts.RivaSpeechSynthesis/"
    words = ("request", "could not be parsed", "UTF-8")

    def cfg(c: Clients) -> bytes:
        return pb.StreamRequest(config=short_config(c)).SerializeToString()

    def riva_first(c: Clients) -> bytes:
        return riva_request(c, "Hello").SerializeToString()

    return [
        Case(
            "text not UTF-8",
            "StreamSynthesize",
            lambda c: _raw(c, "stream_stream", tts + "StreamSynthesize", cfg(c), _string_field(2, BAD_UTF8)),
            INVALID,
            words,
        ),
        Case(
            "first message not UTF-8",
            "StreamSynthesize",
            lambda c: _raw(c, "stream_stream", tts + "StreamSynthesize", _string_field(2, BAD_UTF8)),
            INVALID,
            words,
        ),
        Case(
            "corrupt wire format",
            "StreamSynthesize",
            lambda c: _raw(c, "stream_stream", tts + "StreamSynthesize", cfg(c), b"\x12\x7f\x00"),
            INVALID,
            ("request", "could not be parsed"),
        ),
        Case(
            "text not UTF-8",
            "Synthesize",
            lambda c: _raw(c, "unary_stream", tts + "Synthesize", _string_field(2, BAD_UTF8)),
            INVALID,
            words,
        ),
        Case(
            "display_name not UTF-8",
            "CreateVoice",
            lambda c: _raw(c, "unary_unary", tts + "CreateVoice", _string_field(4, BAD_UTF8)),
            INVALID,
            words,
        ),
        Case(
            "text not UTF-8",
            "Riva.Synthesize",
            lambda c: _raw(c, "unary_unary", riva_svc + "Synthesize", _string_field(1, BAD_UTF8)),
            INVALID,
            words,
        ),
        Case(
            "second message not UTF-8",
            "Riva.SynthesizeOnline",
            lambda c: _raw(
                c, "stream_stream", riva_svc + "SynthesizeOnline", riva_first(c), _string_field(1, BAD_UTF8)
            ),
            INVALID,
            words,
        ),
    ]


CASES = [
    *audio_cases(),
    *text_cases(),
    *voice_and_sampling_cases(),
    *order_cases(),
    *oversized_cases(),
    *undecodable_cases(),
]


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_corpus(case: Case, clients: Clients, neighbour: Neighbour) -> None:
    missing = [e for e in case.needs if not badinput.has_encoder(e)]
    if missing:
        pytest.skip(f"this PyAV build has no {', '.join(missing)} encoder")
    out = case.run(clients)
    record(SECTION, case.name, api=case.api, code=out.code.name, message=out.message)
    assert out.code == case.code, (out.code, out.message)
    if case.code is OK:
        if case.check is not None:
            case.check(clients, out)
        return
    assert out.message, "an error without a message"
    for w in case.words:
        assert w in out.message, (w, out.message)
    assert not neighbour.failures, neighbour.failures


def test_kept_serving_and_nothing_leaked(
    server: ServerThread, clients: Clients, neighbour: Neighbour
) -> None:
    """After the corpus: the healthy streams all finished normally, every session and
    slot is free, the gauge agrees, and no call anywhere ended INTERNAL or UNKNOWN."""
    before = neighbour.done
    assert wait_for(lambda: neighbour.done > before, timeout=60), "the healthy stream stopped completing"
    neighbour.stop()
    assert not neighbour.failures, neighbour.failures
    engine = server.server.runtime.engine
    assert engine is not None
    assert wait_for(lambda: engine.live_sessions == 0, timeout=10), engine.live_sessions
    assert wait_for(lambda: engine.free_slots == engine.config.max_sessions, timeout=10), engine.free_slots
    assert server.metrics_port is not None
    families = scrape(server.metrics_port)
    assert sample(families, "qwen3tts_live_sessions", "qwen3tts_live_sessions") == 0
    assert bad_rpcs(server) == clients.bad_rpcs_before, "a call ended INTERNAL or UNKNOWN"
    record(SECTION, "server kept serving", healthy_streams=neighbour.done, failures=len(neighbour.failures))
    # and it still serves
    out = stream(clients, pb.StreamRequest(config=short_config(clients)), pb.StreamRequest(text=TEXT))
    assert out.code is OK and out.stream is not None and len(out.stream.dones) == 1
    np.testing.assert_array_less(0, len(out.audio))
