"""The streaming engine against the whole-text computation.

A stream whose text arrives in any pieces, at any pace, must give exactly the frames
and samples of ``synthesize`` on the whole text (greedy and seeded), for every kind of
voice; sessions batched together must give exactly what each gives alone.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from qwen3tts_rt.engine.engine import Engine, EngineConfig, Session
from qwen3tts_rt.engine.generation import FrameCap, FrameGenerator, Phase
from qwen3tts_rt.engine.messages import PcmPacket, SessionClosed, SessionError, UtteranceDone
from qwen3tts_rt.engine.synth import new_utterance, synthesize
from qwen3tts_rt.engine.voices import create_voice_clone_prompt, voice_prompt
from qwen3tts_rt.errors import CapacityError, InvalidInputError, UnknownLanguageError
from qwen3tts_rt.model.checkpoint import Checkpoint, load_checkpoint
from qwen3tts_rt.model.cuda_graphs import FastPath
from qwen3tts_rt.model.prompt import VoicePrompt, prefix_embeds
from qwen3tts_rt.model.sampling import SamplingParams

DATA = Path(__file__).parent / "reference" / "data"
EN = "Hello! Streaming text in, one token at a time, 42 times."
ZH = "你好，世界。这是流式合成。"
GREEDY = SamplingParams.greedy(max_new_tokens=16)
SAMPLED = SamplingParams(max_new_tokens=16)


@pytest.fixture(scope="module")
def ckpts(ref_checkpoint_dirs: dict[str, Path]) -> dict[str, Checkpoint]:
    return {k: load_checkpoint(v) for k, v in ref_checkpoint_dirs.items()}


@pytest.fixture(scope="module")
def voices(ckpts: dict[str, Checkpoint]) -> dict[str, tuple[Checkpoint, VoicePrompt]]:
    base = ckpts["tiny-base"]
    audio = np.load(DATA / "ref_audio.npy")
    xvec = create_voice_clone_prompt(base, audio, None, x_vector_only=True, sample_rate=24000)
    icl = create_voice_clone_prompt(base, audio, "Hello there, my name is Tiny.", sample_rate=24000)
    return {
        "custom": (ckpts["tiny-custom"], voice_prompt(ckpts["tiny-custom"], speaker="vivian")),
        "xvec": (base, voice_prompt(base, clone=xvec)),
        "icl": (base, voice_prompt(base, clone=icl)),
        "design": (ckpts["tiny-design"], voice_prompt(ckpts["tiny-design"], instruct="A calm voice.")),
    }


@pytest.fixture(scope="module")
def engines(ckpts: dict[str, Checkpoint]):  # type: ignore[no-untyped-def]
    engs = {k: Engine(c, EngineConfig(max_sessions=4)) for k, c in ckpts.items()}
    yield engs
    for e in engs.values():
        e.shutdown()


def collect(s: Session, timeout: float = 60.0) -> tuple[list[PcmPacket], list[UtteranceDone]]:
    packets, done = [], []
    for m in s.messages(timeout=timeout):
        if isinstance(m, PcmPacket):
            packets.append(m)
        elif isinstance(m, UtteranceDone):
            done.append(m)
        elif isinstance(m, SessionError):
            raise AssertionError(m.message)
    return packets, done


def assert_same_audio(packets: list[PcmPacket], wav: np.ndarray) -> None:
    """The engine's audio is the one-frame-at-a-time decode of ``synthesize``: bit for bit
    where every packet is one frame; where frames were decoded together (adaptive
    packets), within float rounding of the batched convolutions and matmuls."""
    pcm = np.concatenate([p.pcm for p in packets])
    if all(p.frame_end - p.frame_start == 1 for p in packets):
        np.testing.assert_array_equal(pcm, wav)
    else:
        np.testing.assert_allclose(pcm, wav, atol=1e-5, rtol=0)


def feed(s: Session, pieces: list[str], rng: random.Random | None = None) -> None:
    for p in pieces:
        s.push_text(p)
        if rng is not None:
            time.sleep(rng.random() * 0.01)
    s.end_text()


def splits(text: str, how: str, rng: random.Random) -> list[str]:
    if how == "whole":
        return [text]
    if how == "chars":
        return list(text)
    cuts = sorted(rng.sample(range(1, len(text)), k=min(8, len(text) - 1)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def engine_key(voice: str) -> str:
    return {"custom": "tiny-custom", "design": "tiny-design"}.get(voice, "tiny-base")


@pytest.mark.parametrize("voice", ["custom", "xvec", "icl", "design"])
@pytest.mark.parametrize("how", ["whole", "chars", "random"])
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_stream_equals_whole_text(voice, how, params, voices, engines) -> None:  # type: ignore[no-untyped-def]
    ckpt, vp = voices[voice]
    text = ZH if voice == "icl" and how == "random" else EN
    ref = synthesize(ckpt, vp, text, "auto", params, seed=7)
    rng = random.Random(f"{voice}/{how}")  # a str seed, unlike hash(), is the same every run
    s = engines[engine_key(voice)].open_session(vp, "auto", params, seed=7)
    feed(s, splits(text, how, rng), rng)
    packets, done = collect(s)
    codes = np.concatenate([p.codes for p in packets])
    np.testing.assert_array_equal(codes, ref.frames.numpy())
    assert_same_audio(packets, ref.wav)
    assert [d.reason for d in done] == [ref.finish.value]
    assert [p.seq for p in packets] == list(range(len(packets)))
    consumed = [p.chars_consumed for p in packets]
    assert consumed == sorted(consumed) and 0 < consumed[-1] <= len(text)
    n_tokens = len(ckpt.tokenizer.text_ids(text))
    if packets[-1].frame_end >= n_tokens:  # the talker has read the whole text
        assert consumed[-1] == len(text)


def test_batched_sessions_equal_each_alone(voices, engines) -> None:  # type: ignore[no-untyped-def]
    """Four sessions with different voices, languages and lengths, started at different
    ticks on one engine: each gives exactly what it gives alone."""
    eng = engines["tiny-base"]
    ckpt, xvec = voices["xvec"]
    _, icl = voices["icl"]
    jobs = [
        (xvec, "english", EN, GREEDY, None),
        (icl, "chinese", ZH, SAMPLED, 3),
        (xvec, "auto", EN[:20], SAMPLED, 11),
        (icl, "english", EN + " " + EN, GREEDY, None),
    ]
    alone = [synthesize(ckpt, v, t, lang, p, seed=seed) for v, lang, t, p, seed in jobs]
    results: list[np.ndarray | None] = [None] * len(jobs)

    def run(i: int) -> None:
        time.sleep(0.05 * i)  # join at different ticks
        v, lang, t, p, seed = jobs[i]
        s = eng.open_session(v, lang, p, seed=seed)
        feed(s, splits(t, "random", random.Random(i)), random.Random(i))
        packets, _ = collect(s)
        results[i] = np.concatenate([pk.codes for pk in packets])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for got, ref in zip(results, alone):
        assert got is not None
        np.testing.assert_array_equal(got, ref.frames.numpy())
    assert eng.live_sessions == 0


def test_flush_starts_a_new_utterance_and_echoes_the_client_id(voices, engines) -> None:  # type: ignore[no-untyped-def]
    ckpt, vp = voices["custom"]
    s = engines["tiny-custom"].open_session(vp, "english", GREEDY)
    s.push_text("First sentence here.")
    s.flush("one")
    s.push_text("And a second one.")
    s.flush("two")
    s.end_text()
    packets, done = collect(s)
    assert [d.client_id for d in done] == ["one", "two"]
    assert [d.utterance_id for d in done] == [0, 1]
    for d, text in zip(done, ["First sentence here.", "And a second one."]):
        ref = synthesize(ckpt, vp, text, "english", GREEDY)
        got = np.concatenate([p.codes for p in packets if p.utterance_id == d.utterance_id])
        np.testing.assert_array_equal(got, ref.frames.numpy())
        assert d.first_packet_latency_s is not None and d.first_packet_latency_s > 0
        assert d.frames == len(ref.frames)


def test_cancel_stops_at_once_and_the_session_goes_on(voices, engines) -> None:  # type: ignore[no-untyped-def]
    _, vp = voices["custom"]
    eng = engines["tiny-custom"]
    s = eng.open_session(vp, "english", SamplingParams.greedy(max_new_tokens=400))
    s.push_text(EN * 4)
    s.flush()
    first = s.out.get(timeout=30)
    assert isinstance(first, PcmPacket)
    s.cancel()
    seen_done = None
    while seen_done is None:
        m = s.out.get(timeout=30)
        if isinstance(m, UtteranceDone):
            seen_done = m
    assert seen_done.reason == "cancelled"
    assert seen_done.frames < 40  # a long utterance stopped early
    s.push_text("After the barge-in.")
    s.end_text()
    packets, done = collect(s)
    assert packets and [d.reason for d in done] == ["cap"]
    assert eng.live_sessions == 0


def test_frame_cap_scales_with_text_length(voices, engines) -> None:  # type: ignore[no-untyped-def]
    _, vp = voices["custom"]
    eng = engines["tiny-custom"]
    s = eng.open_session(vp, "english", SamplingParams.greedy(max_new_tokens=10_000))
    feed(s, ["Hi."])
    _, done = collect(s)
    cap = eng.config.frame_cap
    n_tokens = len(eng.ckpt.tokenizer.text_ids("Hi."))
    assert done[0].reason == "cap" and done[0].frames == cap.base_frames + cap.frames_per_token * n_tokens


def test_bad_requests_and_capacity(voices, engines) -> None:  # type: ignore[no-untyped-def]
    _, vp = voices["custom"]
    eng = engines["tiny-custom"]
    with pytest.raises(UnknownLanguageError):
        eng.open_session(vp, "klingon", GREEDY)
    with pytest.raises(InvalidInputError):
        eng.open_session(VoicePrompt(), "english", GREEDY)  # CustomVoice needs a speaker
    with pytest.raises(InvalidInputError, match="packet_frames"):
        eng.open_session(vp, "english", GREEDY, packet_frames=0)
    held = [eng.open_session(vp, "english", GREEDY) for _ in range(eng.config.max_sessions)]
    with pytest.raises(CapacityError, match="max_sessions"):
        eng.open_session(vp, "english", GREEDY)
    for s in held:
        s.close()
        s.close()  # safe twice
    deadline = time.time() + 10
    while eng.live_sessions and time.time() < deadline:
        time.sleep(0.01)
    assert eng.live_sessions == 0
    s = eng.open_session(vp, "english", GREEDY)  # capacity is back
    s.close()


def test_text_over_the_limit_fails_only_that_session(voices, ckpts) -> None:  # type: ignore[no-untyped-def]
    _, vp = voices["custom"]
    eng = Engine(ckpts["tiny-custom"], EngineConfig(max_sessions=2, max_utterance_chars=50))
    try:
        s = eng.open_session(vp, "english", GREEDY)
        s.push_text("x" * 51)
        msgs = list(s.messages(timeout=10))
        assert isinstance(msgs[-1], SessionError) and "max_utterance_chars" in msgs[-1].message
        ok = eng.open_session(vp, "english", GREEDY)
        feed(ok, ["Fine."])
        packets, _ = collect(ok)
        assert packets
    finally:
        eng.shutdown()
        eng.shutdown()


def test_fixed_one_frame_packets_are_bit_identical(voices, engines) -> None:  # type: ignore[no-untyped-def]
    ckpt, vp = voices["custom"]
    ref = synthesize(ckpt, vp, EN, "english", GREEDY)
    s = engines["tiny-custom"].open_session(vp, "english", GREEDY, packet_policy="fixed", packet_frames=1)
    feed(s, [EN])
    packets, _ = collect(s)
    assert {p.frame_end - p.frame_start for p in packets} == {1}
    np.testing.assert_array_equal(np.concatenate([p.pcm for p in packets]), ref.wav)


def test_adaptive_packets_grow_and_keep_the_audio(voices, engines) -> None:  # type: ignore[no-untyped-def]
    """A stream far faster than real time (a clock that moves 1 ms per reading): after the
    first 1-frame packet the listener gets ahead and packets grow, up to
    ``max_packet_frames``; the frames are the whole-text ones and the audio their
    one-frame decode."""
    ckpt, vp = voices["custom"]
    text = EN + " " + EN
    ref = synthesize(ckpt, vp, text, "english", GREEDY)
    ticks = itertools.count()
    eng = Engine(ckpt, EngineConfig(max_sessions=1), clock=lambda: next(ticks) * 1e-3)  # 1 ms per reading
    try:
        s = eng.open_session(vp, "english", GREEDY, packet_policy="adaptive", max_packet_frames=4)
        feed(s, [text])
        packets, _ = collect(s)
    finally:
        eng.shutdown()
    sizes = [p.frame_end - p.frame_start for p in packets]
    assert sizes[0] == 1 and max(sizes) > 1 and max(sizes) <= 4, sizes
    np.testing.assert_array_equal(np.concatenate([p.codes for p in packets]), ref.frames.numpy())
    assert_same_audio(packets, ref.wav)


def test_packet_sizes(voices, engines) -> None:  # type: ignore[no-untyped-def]
    ckpt, vp = voices["custom"]
    ref = synthesize(ckpt, vp, EN, "english", GREEDY)
    s = engines["tiny-custom"].open_session(vp, "english", GREEDY, first_packet_frames=2, packet_frames=5)
    feed(s, [EN])
    packets, _ = collect(s)
    sizes = [p.frame_end - p.frame_start for p in packets]
    assert sizes[0] == 2 and all(n == 5 for n in sizes[1:-1]) and 1 <= sizes[-1] <= 5
    np.testing.assert_array_equal(np.concatenate([p.codes for p in packets]), ref.frames.numpy())
    np.testing.assert_allclose(np.concatenate([p.pcm for p in packets]), ref.wav, atol=1e-5)
    assert isinstance(s.out.get(timeout=1) if len(s.out) else SessionClosed(), SessionClosed)


# --------------------------------------------------------------------------- whole-text layout
# ``non_streaming_mode=True``: the generator prefills the prefix before any text and the
# whole text once it has ended. These tests drive ``FrameGenerator`` as the engine does
# (text pushed between ticks, in any pieces) and compare with ``synthesize``.


def _id_pieces(ids: list[int], rng: random.Random) -> list[list[int]]:
    cuts = sorted(rng.sample(range(1, len(ids)), k=min(5, len(ids) - 1)))
    return [ids[a:b] for a, b in zip([0, *cuts], [*cuts, len(ids)])]


def _decode(ckpt: Checkpoint, vp: VoicePrompt, frames: list) -> np.ndarray:  # type: ignore[type-arg]
    """The frames through the streaming decoder, one per step, as ``synthesize`` does."""
    dec = ckpt.codec.decoder
    state = dec.new_state(1, ckpt.codec.device, ckpt.codec.dtype)
    if vp.ref_codes is not None:
        dec.decode_step(vp.ref_codes[None], state)
    return np.concatenate([dec.decode_step(f.view(1, 1, -1), state)[0].float().numpy() for f in frames])


_DYNAMIC, _STATIC = FastPath(), FastPath(static=True, emulate_graphs=True)


@pytest.mark.parametrize(
    "voice, params, fast",
    [
        ("custom", GREEDY, _DYNAMIC),
        ("custom", SAMPLED, _STATIC),
        ("xvec", SAMPLED, _DYNAMIC),
        ("icl", GREEDY, _DYNAMIC),
        ("icl", SAMPLED, _STATIC),
        ("design", SAMPLED, _DYNAMIC),
    ],
    ids=[
        "custom-greedy",
        "custom-seeded-static",
        "xvec-seeded",
        "icl-greedy",
        "icl-seeded-static",
        "design-seeded",
    ],
)
def test_whole_text_pieces_equal_synthesize(voice, params, fast, voices) -> None:  # type: ignore[no-untyped-def]
    ckpt, vp = voices[voice]
    ref = synthesize(ckpt, vp, EN, "english", params, seed=5, non_streaming_mode=True)
    ids = ckpt.tokenizer.text_ids(EN)
    st = new_utterance(ckpt, vp, "english", params, seed=5, slot=1, non_streaming_mode=True)
    gen = FrameGenerator(ckpt.model, slots=2, fast=fast)
    assert gen.tick([st]) == []  # no text yet: the prefix is prefilled, nothing else
    prefix_len = prefix_embeds(ckpt.model, vp, st.language_id, st.role_ids).shape[0]
    assert st.phase is Phase.OVERLAY and st.cache_len == prefix_len
    for piece in _id_pieces(ids, random.Random(f"whole/{voice}")):
        st.sched.push(piece)
        assert gen.tick([st]) == []  # the whole-text layout waits for the end of the text
        assert st.cache_len == prefix_len and st.sched.text_tokens_consumed(st.positions_consumed) == 0
    st.sched.end()
    st.max_frames = FrameCap().frames(params, len(ids))
    frames = []
    while st.finish is None:
        frames += [f for _, f in gen.tick([st])]
        assert st.sched.text_tokens_consumed(st.positions_consumed) == len(ids)  # all read at once
    assert st.finish is ref.finish and st.error is None
    np.testing.assert_array_equal(np.stack(frames), ref.frames.numpy())
    np.testing.assert_array_equal(_decode(ckpt, vp, frames), ref.wav)


def test_layouts_differ_and_batch_together(voices) -> None:  # type: ignore[no-untyped-def]
    """A whole-text and a dual-track utterance of one voice stepped in the same ticks,
    text arriving piece by piece: each gives exactly what it gives alone, and the two
    layouts give different frames (the comparison is not vacuous)."""
    ckpt, vp = voices["icl"]
    ids = ckpt.tokenizer.text_ids(EN)
    refs = {
        m: synthesize(ckpt, vp, EN, "english", SAMPLED, seed=9, non_streaming_mode=m) for m in (False, True)
    }
    assert not np.array_equal(refs[False].frames.numpy(), refs[True].frames.numpy())
    gen = FrameGenerator(ckpt.model, slots=2)
    states = {
        m: new_utterance(ckpt, vp, "english", SAMPLED, seed=9, slot=int(m), non_streaming_mode=m)
        for m in (False, True)
    }
    live = list(states.values())
    got: dict[int, list] = {id(st): [] for st in live}  # type: ignore[type-arg]
    pieces = iter([[i] for i in ids])
    early = 0
    while any(st.finish is None for st in live):
        piece = next(pieces, None)
        for st in live:
            if piece is not None:
                st.sched.push(piece)
            elif not st.sched.ended:
                st.sched.end()
                st.max_frames = FrameCap().frames(SAMPLED, len(ids))
        for st, f in gen.tick(live):
            got[id(st)].append(f)
            if not st.sched.ended:  # only dual-track speaks before the end of the text
                assert not st.sched.non_streaming_mode
                early += 1
    assert early > 0
    for m, st in states.items():
        np.testing.assert_array_equal(np.stack(got[id(st)]), refs[m].frames.numpy())
