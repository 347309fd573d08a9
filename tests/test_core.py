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
from collections.abc import Sequence

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
    moved = False
    for u in table.runnable():
        g: FakeGen = u.handle
        if g.done():
            table.on_finished(u, "eos")
            moved = True
        elif g.ready():
            i = g.frames
            token = g.ids[i] if i < len(g.ids) else -1
            value = float(hash((g.voice, g.seed, token, i)) % 1000)  # same inputs, same audio
            g.frames += 1
            table.on_frame(u, np.full(4, value, np.float32), np.array([token, i]))
            moved = True
    return moved


def spec(voice: str = "v", seed: int | None = 7, packet: int = 1, whole: bool = False) -> SessionSpec:
    return SessionSpec(voice, "auto", "params", seed, packet, packet, whole)


def make(slots: int = 2, **limits: int) -> SessionTable:
    return SessionTable(
        TableLimits(max_sessions=slots, **limits), FakeBackend(), CharTokenizer, sample_rate=4
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
    st.integers(1, 2),
)
def test_random_command_sequences_keep_every_rule(
    commands: list[tuple[int, tuple[object, ...]]], slots: int, packet: int
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
@given(st.integers(0, 40), st.integers(1, 2), st.booleans())
def test_cancelling_one_utterance_leaves_the_others_byte_identical(at: int, packet: int, whole: bool) -> None:
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
