"""The session table (engine/core.py) without a model: a fake backend that "generates"
one frame per known text entry, and hypothesis over random command sequences.

Checked for every sequence: each utterance ends at most once and in utterance order, no
audio of an utterance follows its end, every utterance that was spoken or named and not
dropped ends exactly once, and no slot or session leaks. Cancelling one utterance by key
leaves the audio of the others byte-identical.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen3tts_rt.engine.channel import Channel
from qwen3tts_rt.engine.core import (
    Begin,
    Cancel,
    Close,
    End,
    Flush,
    Open,
    SessionSpec,
    SessionTable,
    TableLimits,
    Text,
    Utterance,
    UtteranceOptions,
)
from qwen3tts_rt.engine.messages import EngineMessage, PcmPacket, SessionClosed, SessionError, UtteranceDone
from qwen3tts_rt.engine.packets import PacketPolicy
from qwen3tts_rt.engine.text import has_speech


class CharTokenizer:
    """One token per character (enough for the table's rules)."""

    def __init__(self) -> None:
        self._ends: list[int] = []

    @property
    def char_ends(self) -> Sequence[int]:
        return self._ends

    def push(self, delta: str) -> list[int]:
        start = self._ends[-1] if self._ends else 0
        self._ends.extend(range(start + 1, start + len(delta) + 1))
        return [ord(c) for c in delta]

    def end(self) -> list[int]:
        return []


class FakeGen:
    def __init__(self, u: Utterance) -> None:
        self.voice, self.seed, self.whole = u.voice, u.seed, u.non_streaming_mode
        self.ids: list[int] = []
        self.ended = False
        self.frames = 0
        self.released = False

    def ready(self) -> bool:
        if self.whole and not self.ended:
            return False
        return self.frames < len(self.ids) or self.ended

    def done(self) -> bool:
        return self.ended and self.frames >= len(self.ids) + 1


class FakeBackend:
    def __init__(self) -> None:
        self.started: list[int] = []

    def start(self, u: Utterance) -> None:
        u.handle = FakeGen(u)
        self.started.append(u.uid)

    def push(self, u: Utterance, ids: list[int]) -> None:
        u.handle.ids.extend(ids)

    def end(self, u: Utterance) -> None:
        u.handle.ended = True

    def release(self, u: Utterance) -> None:
        u.handle.released = True

    def consumed(self, u: Utterance) -> int:
        g: FakeGen = u.handle
        return len(g.ids) if g.whole else min(g.frames, len(g.ids))


def tick(table: SessionTable) -> bool:
    """One device-loop tick: a frame for each ready head, then the frames due decoded
    (the fake decoder repeats each frame's value 4 times), then the ends."""
    moved, finishing = False, []
    for u in table.runnable():
        g: FakeGen = u.handle
        if g.done():
            finishing.append(u)
        elif g.ready():
            i = g.frames
            token = g.ids[i] if i < len(g.ids) else -1
            value = hash((g.voice, g.seed, token, i)) % 1000  # same inputs, same audio
            g.frames += 1
            table.on_frame(u, np.array([token, i, value]))
            moved = True
    for u, codes in table.to_decode(finishing):
        table.on_decoded(u, np.repeat(codes[:, 2].astype(np.float32), 4))
    for u in finishing:
        table.on_finished(u, "eos")
    return moved or bool(finishing)


def spec(voice: str = "v", seed: int | None = 7, packet: int | str = 1, whole: bool = False) -> SessionSpec:
    """``packet``: a fixed size, or "adaptive" (up to 3 frames, first packet 1)."""
    if packet == "adaptive":
        packets = PacketPolicy("adaptive", max_packet_frames=3)
    else:
        assert isinstance(packet, int)
        packets = PacketPolicy("fixed", first_packet_frames=packet, packet_frames=packet)
    return SessionSpec(voice, "auto", "params", seed, packets, whole)


def make(slots: int = 2, clock: Callable[[], float] | None = None, **limits: int) -> SessionTable:
    """4 samples per frame at ``sample_rate=50``: 80 ms frames, as the real codec."""
    kw = {} if clock is None else {"clock": clock}
    return SessionTable(
        TableLimits(max_sessions=slots, **limits), FakeBackend(), CharTokenizer, sample_rate=50, **kw
    )


def open_session(table: SessionTable, sid: int, **kw: object) -> Channel[EngineMessage]:
    out: Channel[EngineMessage] = Channel()
    table.reserve()
    table.apply(Open(sid, spec(**kw), out))  # type: ignore[arg-type]
    return out


def drain(out: Channel[EngineMessage]) -> list[EngineMessage]:
    msgs = []
    while len(out):
        msgs.append(out.get(0))
    return msgs


def settle(table: SessionTable) -> None:
    for _ in range(10_000):
        if not tick(table):
            return
    raise AssertionError("the table never settled")


def audio_by_utterance(msgs: list[EngineMessage]) -> dict[int, bytes]:
    audio: dict[int, bytes] = {}
    for m in msgs:
        if isinstance(m, PcmPacket):
            audio[m.utterance_id] = audio.get(m.utterance_id, b"") + m.pcm.tobytes()
    return audio


# ---------------------------------------------------------------------------- rules


def test_the_table_imports_no_torch() -> None:
    code = "import sys, qwen3tts_rt.engine.core; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_named_utterances_carry_their_key_and_end_in_order() -> None:
    table = make()
    out = open_session(table, 1)
    table.apply(Begin(1, "a", UtteranceOptions()))
    table.apply(Text(1, "hi"))
    table.apply(Begin(1, "b", UtteranceOptions(voice="w", seed=3)))  # flushes "a" first
    table.apply(Text(1, "yo"))
    table.apply(End(1))
    settle(table)
    msgs = drain(out)
    keys = {(m.utterance_id, m.key) for m in msgs if isinstance(m, (PcmPacket, UtteranceDone))}
    assert keys == {(0, "a"), (1, "b")}
    dones = [m for m in msgs if isinstance(m, UtteranceDone)]
    assert [(d.utterance_id, d.key, d.reason) for d in dones] == [(0, "a", "eos"), (1, "b", "eos")]
    assert isinstance(msgs[-1], SessionClosed)
    assert table.live == 0 and len(table.free_slots) == 2


def test_begin_on_a_fresh_utterance_renames_it_and_restarts_it_with_its_voice() -> None:
    table = make()
    out = open_session(table, 1)
    backend = table.backend
    assert isinstance(backend, FakeBackend)
    table.apply(Begin(1, "k", UtteranceOptions(voice="other")))
    head = table.sessions[1].utterances[0]
    assert head.uid == 0 and head.key == "k" and head.voice == "other" and head.handle.voice == "other"
    assert backend.started == [0, 0]  # prefilled again with its own voice
    table.apply(End(1))
    settle(table)
    assert [m.key for m in drain(out) if isinstance(m, UtteranceDone)] == ["k"]  # named: reported


def test_a_queued_utterance_cancelled_by_key_reports_after_the_ones_before_it() -> None:
    table = make()
    out = open_session(table, 1)
    for key in ("a", "b", "c"):
        table.apply(Begin(1, key, UtteranceOptions()))
        table.apply(Text(1, f"text {key}"))
    table.apply(Flush(1))
    table.apply(Cancel(1, "b"))
    table.apply(End(1))
    settle(table)
    dones = [m for m in drain(out) if isinstance(m, UtteranceDone)]
    assert [(d.key, d.reason) for d in dones] == [("a", "eos"), ("b", "cancelled"), ("c", "eos")]


def test_silent_text_is_one_rule_whitespace_and_zero_width_alike() -> None:
    for silent in (" \n\t", "\u200b\u200d", "\u00a0\ufeff", "\x00\x07"):
        assert not has_speech(silent)
        table = make()
        out = open_session(table, 1)
        table.apply(Text(1, silent))
        table.apply(Flush(1))  # anonymous and silent: nothing at all
        table.apply(Text(1, silent))
        table.apply(Flush(1, "named"))  # named: an end with no audio
        table.apply(End(1))
        settle(table)
        msgs = drain(out)
        assert not [m for m in msgs if isinstance(m, PcmPacket)]
        assert [(m.client_id, m.frames) for m in msgs if isinstance(m, UtteranceDone)] == [("named", 0)]


def test_leading_silence_is_held_then_sent_so_offsets_count_client_characters() -> None:
    table = make()
    out = open_session(table, 1)
    table.apply(Text(1, "  "))
    table.apply(Text(1, "\x01ab"))
    table.apply(End(1))
    settle(table)
    packets = [m for m in drain(out) if isinstance(m, PcmPacket)]
    assert packets[-1].chars_consumed == 5  # "  " + " " (the control character) + "ab"


def test_limits_give_clear_errors_and_free_everything() -> None:
    table = make(slots=1, max_pending_utterances=2, max_utterance_chars=5)
    out = open_session(table, 1)
    table.apply(Text(1, "toolong"))
    msgs = drain(out)
    assert isinstance(msgs[0], SessionError) and "max_utterance_chars" in msgs[0].message
    assert table.live == 0 and table.free_slots == [0]
    out = open_session(table, 2)
    for _ in range(3):
        table.apply(Text(2, "a"))
        table.apply(Flush(2))
    errors = [m for m in drain(out) if isinstance(m, SessionError)]
    assert errors and "max_pending_utterances" in errors[0].message and errors[0].kind == "capacity"
    assert table.live == 0 and table.free_slots == [0]


def test_heads_wait_for_a_slot_in_order() -> None:
    table = make(slots=1)
    outs = {sid: open_session(table, sid) for sid in (1,)}
    table.apply(Text(1, "ab"))
    table.apply(End(1))
    assert table.free_slots == []
    table.limits = TableLimits(max_sessions=2)  # admit a second session; it has no slot
    outs[2] = open_session(table, 2)
    table.apply(Text(2, "cd"))
    table.apply(End(2))
    assert [u.sid for u in table.waiting] == [2]
    settle(table)
    for out in outs.values():
        assert isinstance(drain(out)[-1], SessionClosed)
    assert table.free_slots == [0] and not table.waiting


def test_whole_text_utterance_waits_for_its_text_then_reads_it_all() -> None:
    table = make()
    out = open_session(table, 1, whole=True)
    table.apply(Text(1, "abc"))
    settle(table)
    assert not drain(out)  # nothing before the text ends
    table.apply(Flush(1))
    settle(table)
    packets = [m for m in drain(out) if isinstance(m, PcmPacket)]
    assert packets and all(p.chars_consumed == 3 for p in packets)


# ---------------------------------------------------------------------------- properties

KEYS = st.sampled_from(["", "a", "b", "c"])
COMMAND = st.one_of(
    st.tuples(st.just("text"), st.sampled_from(["hi", " ", "yo ", "\u200b", "abc"])),
    st.tuples(st.just("begin"), KEYS, st.booleans()),
    st.tuples(st.just("flush"), KEYS),
    st.tuples(st.just("cancel"), st.one_of(st.none(), KEYS.filter(bool))),
    st.tuples(st.just("tick"), st.integers(1, 4)),
    st.tuples(st.just("close")),
)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(1, 3), COMMAND), max_size=60),
    st.integers(1, 3),
    st.sampled_from([1, 2, "adaptive"]),
)
def test_random_command_sequences_keep_every_rule(
    commands: list[tuple[int, tuple[object, ...]]], slots: int, packet: int | str
) -> None:
    table = make(slots=slots, max_pending_utterances=6)
    outs: dict[int, Channel[EngineMessage]] = {}
    closed: set[int] = set()
    for sid in (1, 2, 3):
        if len(outs) < slots:
            outs[sid] = open_session(table, sid, packet=packet)
    for sid, cmd in commands:
        if sid not in outs or sid in closed:
            continue
        kind = cmd[0]
        if kind == "text":
            table.apply(Text(sid, str(cmd[1])))
        elif kind == "begin":
            table.apply(Begin(sid, str(cmd[1]), UtteranceOptions(non_streaming_mode=bool(cmd[2]))))
        elif kind == "flush":
            table.apply(Flush(sid, str(cmd[1])))
        elif kind == "cancel":
            table.apply(Cancel(sid, cmd[1]))  # type: ignore[arg-type]
        elif kind == "tick":
            for _ in range(int(cmd[1])):  # type: ignore[call-overload]
                tick(table)
        elif kind == "close":
            table.apply(Close(sid))
            closed.add(sid)
    for sid in outs:
        table.apply(End(sid))
    settle(table)
    for sid, out in outs.items():
        msgs = drain(out)
        done_ids = [m.utterance_id for m in msgs if isinstance(m, UtteranceDone)]
        assert done_ids == sorted(set(done_ids)), "ends out of order or twice"
        ended: set[int] = set()
        for m in msgs:
            if isinstance(m, UtteranceDone):
                ended.add(m.utterance_id)
            elif isinstance(m, PcmPacket):
                assert m.utterance_id not in ended, "audio after its utterance ended"
        assert msgs and isinstance(msgs[-1], (SessionClosed, SessionError))
        if sid not in closed and isinstance(msgs[-1], SessionClosed):
            spoken = {m.utterance_id for m in msgs if isinstance(m, PcmPacket)}
            assert spoken <= ended, "an utterance with audio never ended"
    assert table.live == 0 and sorted(table.free_slots) == list(range(slots)) and not table.waiting
    assert not table.sessions


@settings(max_examples=80, deadline=None, derandomize=True)
@given(st.integers(0, 40), st.sampled_from([1, 2, "adaptive"]), st.booleans())
def test_cancelling_one_utterance_leaves_the_others_byte_identical(
    at: int, packet: int | str, whole: bool
) -> None:
    script: list[tuple[str, str]] = []
    for key in ("a", "b", "c"):
        script += [("begin", key), ("text", f"words of {key} "), ("tick", ""), ("text", "more"), ("tick", "")]
    script.append(("flush", ""))

    def run(cancel_at: int | None) -> dict[int, bytes]:
        table = make(slots=1)
        out = open_session(table, 1, packet=packet, whole=whole)
        for i, (kind, arg) in enumerate([*script, *[("tick", "")] * 40]):
            if i == cancel_at:
                table.apply(Cancel(1, "b"))
            if kind == "begin":
                table.apply(Begin(1, arg, UtteranceOptions()))
            elif kind == "text":
                table.apply(Text(1, arg))
            elif kind == "flush":
                table.apply(Flush(1))
            else:
                tick(table)
        table.apply(End(1))
        settle(table)
        return audio_by_utterance(drain(out))

    plain, cancelled = run(None), run(at)
    assert set(cancelled) - {1} == set(plain) - {1} == {0, 2}
    for uid in (0, 2):  # "a" and "c": same ids, same seeds, same audio
        assert cancelled[uid] == plain[uid]


# ---------------------------------------------------------------------------- packets


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _packets_of(packet: int | str, step_s: float, text: str = "x" * 30, pace: int = 0) -> list[PcmPacket]:
    """One utterance of ``text``, a tick every ``step_s`` seconds; ``pace`` > 0: the text
    arrives one character per ``pace`` ticks after the first (else all at once)."""
    clock = Clock()
    table = make(slots=1, clock=clock)
    out = open_session(table, 1, packet=packet)
    sent = 1 if pace else len(text)
    table.apply(Text(1, text[:sent]))
    ended = False
    for i in range(10_000):
        if pace and sent < len(text) and i % pace == 0:
            table.apply(Text(1, text[sent]))
            sent += 1
        if sent == len(text) and not ended:
            table.apply(End(1))
            ended = True
        clock.now += step_s
        tick(table)
        if not table.sessions:
            break
    return [m for m in drain(out) if isinstance(m, PcmPacket)]


def test_adaptive_packets_grow_while_the_listener_is_ahead_with_the_same_audio() -> None:
    fixed = _packets_of(1, step_s=0.01)  # 8x faster than real time
    grown = _packets_of("adaptive", step_s=0.01)
    sizes = [p.frame_end - p.frame_start for p in grown]
    assert sizes[0] == 1 and max(sizes) == 3 and len(grown) < len(fixed)
    assert (
        np.concatenate([p.pcm for p in grown]).tobytes() == np.concatenate([p.pcm for p in fixed]).tobytes()
    )
    assert [p.frame_start for p in grown[1:]] == [p.frame_end for p in grown[:-1]]


def test_adaptive_packets_stay_one_frame_when_the_text_is_slow() -> None:
    grown = _packets_of("adaptive", step_s=0.01, pace=3)  # the talker waits for each character
    assert {p.frame_end - p.frame_start for p in grown[:-1]} == {1}


def test_adaptive_packets_stay_small_when_just_in_time() -> None:
    """A frame per 79 ms: the listener never gets far enough ahead to hold a frame."""
    grown = _packets_of("adaptive", step_s=0.079)
    assert {p.frame_end - p.frame_start for p in grown} == {1}


def test_adaptive_packets_grow_when_the_stream_is_slower_than_real_time() -> None:
    """A frame per 200 ms: the listener waits anyway; bigger packets cut the decoder cost."""
    grown = _packets_of("adaptive", step_s=0.2)
    sizes = [p.frame_end - p.frame_start for p in grown]
    assert sizes[0] == 1 and sizes.count(3) >= len(sizes) - 3


def test_a_stream_holding_as_many_frames_as_a_leaving_packet_joins_its_decoder_call() -> None:
    clock = Clock()
    table = make(slots=2, clock=clock)
    outs = [open_session(table, sid, packet="adaptive") for sid in (1, 2)]
    for sid in (1, 2):
        table.apply(Text(sid, "x" * 20))
    for _ in range(3):  # first packets out, then two frames held by each (the listener is ahead)
        clock.now += 0.001
        for u in table.runnable():
            g: FakeGen = u.handle
            table.on_frame(u, np.array([g.ids[g.frames], g.frames, 1]))
            g.frames += 1
        for u, codes in table.to_decode():
            table.on_decoded(u, np.repeat(codes[:, 2].astype(np.float32), 4))
        for s in table.sessions.values():
            s.play_until = clock.now + 10.0  # far ahead: nothing is due
    assert [len(s.utterances[0].pending_codes) for s in table.sessions.values()] == [2, 2]
    assert table.to_decode() == []
    table.sessions[1].play_until = clock.now  # session 1's listener has caught up: its 2 frames leave
    due = table.to_decode()
    assert sorted(u.sid for u, _ in due) == [1, 2] and {len(c) for _, c in due} == {2}
    assert all(drain(out) for out in outs)
