"""Faults and limits inside the engine: a step that raises for one session ends only that
session, and the others in the same batch finish exactly as they would have alone; a
client that stops reading holds a bounded backlog; flushes cannot queue without bound."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from qwen3tts_rt.engine.engine import Engine, EngineConfig, Session
from qwen3tts_rt.engine.generation import run_isolated
from qwen3tts_rt.engine.messages import PcmPacket, SessionClosed, SessionError, UtteranceDone
from qwen3tts_rt.engine.voices import voice_prompt
from qwen3tts_rt.model.checkpoint import Checkpoint
from qwen3tts_rt.model.sampling import SamplingParams
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc
from tests.reliability import record
from tests.server_helpers import BidiCall, collect, start_server, wait_for

GREEDY = SamplingParams.greedy(max_new_tokens=40)
TEXTS = {
    "a": "Good morning, this stream carries the zebra word and fails.",
    "b": "Hello there, this one speaks to the end.",
    "c": "A third stream, batched with the others.",
}


@pytest.fixture(scope="module")
def ckpt(tiny_loaded: Callable[..., Checkpoint]) -> Checkpoint:
    return tiny_loaded("custom_voice")


def run(s: Session, text: str, timeout: float = 120.0) -> tuple[np.ndarray, SessionError | None]:
    """Feed the whole text, read to the end: (codes [F, G] of every packet, the error if any)."""
    s.push_text(text)
    s.end_text()
    codes: list[np.ndarray] = []
    for m in s.messages(timeout=timeout):
        if isinstance(m, PcmPacket):
            codes.append(m.codes)
        elif isinstance(m, SessionError):
            return np.concatenate(codes) if codes else np.zeros((0, 16), np.int64), m
    return np.concatenate(codes), None


def poison_id(ckpt: Checkpoint) -> int:
    """A text token of stream a that neither other stream has, past its first token (so the
    fault hits a batched talker step, not the prefill)."""
    ids = {k: ckpt.tokenizer.text_ids(t) for k, t in TEXTS.items()}
    others = set(ids["b"]) | set(ids["c"])
    return next(i for i in ids["a"][3:] if i not in others)


def inject_fault(ckpt: Checkpoint, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Make the talker's text embedding raise whenever stream a's poison token is in its
    input; returns the count of faults raised."""
    bad = poison_id(ckpt)
    real = ckpt.model.text_embed
    calls = {"faults": 0}

    def faulty(ids: torch.Tensor) -> torch.Tensor:
        if bool((ids == bad).any()):
            calls["faults"] += 1
            raise RuntimeError("injected fault")
        return real(ids)

    monkeypatch.setattr(ckpt.model, "text_embed", faulty)
    return calls


def test_run_isolated_retries_each_item_alone() -> None:
    failed: list[tuple[int, str]] = []

    def step(items: list[int]) -> list[int]:
        if 3 in items:
            raise ValueError("bad item")
        return [10 * i for i in items]

    got = run_isolated([1, 2, 3, 4], step, lambda i, e: failed.append((i, str(e))))
    assert got == [(1, 10), (2, 20), (4, 40)]
    assert failed == [(3, "bad item")]
    assert run_isolated([], step, lambda i, e: failed.append((i, str(e)))) == []


def test_a_fault_in_one_session_fails_only_it(ckpt: Checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    speaker = ckpt.config.speakers[0]
    voice = voice_prompt(ckpt, speaker=speaker)
    engine = Engine(ckpt, EngineConfig(max_sessions=4))
    try:
        alone = {}
        for k in ("b", "c"):
            codes, err = run(engine.open_session(voice, "english", GREEDY), TEXTS[k])
            assert err is None
            alone[k] = codes

        calls = inject_fault(ckpt, monkeypatch)
        # Open all three before any text, so that they share ticks from the first frame.
        sessions = {k: engine.open_session(voice, "english", GREEDY) for k in TEXTS}
        results: dict[str, Any] = {}
        threads = [
            threading.Thread(target=lambda k=k: results.__setitem__(k, run(sessions[k], TEXTS[k])))
            for k in TEXTS
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert calls["faults"] >= 2  # it fired in a batch, then again for a alone
        _, err_a = results["a"]
        assert err_a is not None and err_a.kind == "internal"
        assert "injected fault" in err_a.message
        for k in ("b", "c"):
            codes, err = results[k]
            assert err is None, err
            np.testing.assert_array_equal(codes, alone[k])  # identical to alone, frame for frame
        assert wait_for(lambda: engine.live_sessions == 0 and engine.free_slots == 4, 10)
        record(
            "faults",
            "exception in one session's batched talker step",
            batch=3,
            failed_stream="INTERNAL: " + err_a.message,
            others="finished with frames identical to running alone",
            leaked_sessions=engine.live_sessions,
        )
    finally:
        engine.shutdown()


def test_a_fault_in_the_decoder_fails_only_its_session(
    ckpt: Checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    voice = voice_prompt(ckpt, speaker=ckpt.config.speakers[0])
    engine = Engine(ckpt, EngineConfig(max_sessions=4))
    try:
        alone, err = run(engine.open_session(voice, "english", GREEDY), TEXTS["b"])
        assert err is None
        victim = engine.open_session(voice, "english", GREEDY)
        other = engine.open_session(voice, "english", GREEDY)
        # Slots are taken in order: the victim holds the first free one.
        assert wait_for(lambda: engine.free_slots == 2, 10)
        victim_slot = next(u.slot for u in engine.table.sessions[victim.id].utterances if u.slot is not None)
        real_step = engine._dec.step

        def step(slots: list[int], frames: torch.Tensor) -> torch.Tensor:
            if victim_slot in slots:
                raise RuntimeError("injected decoder fault")
            return real_step(slots, frames)

        monkeypatch.setattr(engine._dec, "step", step)
        out: dict[str, Any] = {}
        t = threading.Thread(target=lambda: out.__setitem__("victim", run(victim, TEXTS["a"])))
        t.start()
        codes, err = run(other, TEXTS["b"])
        t.join(120)
        assert err is None
        np.testing.assert_array_equal(codes, alone)
        _, verr = out["victim"]
        assert verr is not None and "injected decoder fault" in verr.message
        assert wait_for(lambda: engine.live_sessions == 0 and engine.free_slots == 4, 10)
    finally:
        engine.shutdown()


def test_a_client_that_does_not_read_holds_a_bounded_backlog(ckpt: Checkpoint) -> None:
    voice = voice_prompt(ckpt, speaker=ckpt.config.speakers[0])
    params = SamplingParams.greedy(max_new_tokens=120)
    text = "A long text that would give many packets if nobody stopped the engine from running ahead."
    free = Engine(ckpt, EngineConfig(max_sessions=2))
    limit = 8
    bounded = Engine(ckpt, EngineConfig(max_sessions=2, max_buffered_packets=limit))
    try:
        want, err = run(free.open_session(voice, "english", params), text)
        assert err is None and len(want) > 3 * limit
        s = bounded.open_session(voice, "english", params)
        s.push_text(text)
        s.end_text()
        assert wait_for(lambda: len(s.out) >= limit, 60)
        time.sleep(0.5)  # the worker would go on producing here if nothing held it back
        assert len(s.out) == limit
        codes: list[np.ndarray] = []
        peak = 0
        for m in s.messages(timeout=60):
            peak = max(peak, len(s.out) + 1)
            if isinstance(m, PcmPacket):
                codes.append(m.codes)
            assert not isinstance(m, SessionError), m
        np.testing.assert_array_equal(np.concatenate(codes), want)  # paused, not changed
        assert peak <= limit + 2  # packets plus the utterance end and the close
        record(
            "load",
            "client that stops reading (engine backpressure)",
            max_buffered_packets=limit,
            backlog_held=limit,
            frames_after_resume="identical to an unthrottled run",
        )
    finally:
        free.shutdown()
        bounded.shutdown()


def test_flushes_cannot_queue_without_bound(ckpt: Checkpoint) -> None:
    voice = voice_prompt(ckpt, speaker=ckpt.config.speakers[0])
    engine = Engine(ckpt, EngineConfig(max_sessions=2, max_pending_utterances=3))
    try:
        s = engine.open_session(voice, "english", GREEDY)
        for i in range(10):
            s.push_text(f"Sentence number {i}.")
            s.flush()
        msgs = list(s.messages(timeout=60))
        err = msgs[-1]
        assert isinstance(err, SessionError) and err.kind == "capacity"
        assert "max_pending_utterances" in err.message
        assert not any(isinstance(m, SessionClosed) for m in msgs)
        assert sum(isinstance(m, UtteranceDone) for m in msgs) <= 3
        assert wait_for(lambda: engine.live_sessions == 0 and engine.free_slots == 2, 10)
    finally:
        engine.shutdown()


def test_over_grpc_the_faulty_stream_gets_internal_and_the_others_finish(
    ckpt: Checkpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    srv = start_server(ckpt, tmp_path / "voices", max_sessions=4, warmup=False)
    try:
        inject_fault(ckpt, monkeypatch)
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.TextToSpeechStub(ch)
            cfg = pb.StreamConfig(
                speaker=ckpt.config.speakers[0],
                language="english",
                sampling=pb.SamplingParams(greedy=True, max_new_tokens=40),
            )
            calls = {k: BidiCall(stub).send(config=cfg) for k in TEXTS}
            for k, c in calls.items():
                c.text(TEXTS[k]).close()
            outcome: dict[str, Any] = {}

            def read(k: str) -> None:
                try:
                    outcome[k] = collect(calls[k])
                except grpc.RpcError as e:
                    outcome[k] = e

            threads = [threading.Thread(target=read, args=(k,)) for k in TEXTS]
            for t in threads:
                t.start()
            for t in threads:
                t.join(180)
        err = outcome["a"]
        assert isinstance(err, grpc.RpcError)
        assert err.code() == grpc.StatusCode.INTERNAL
        assert "generation failed: RuntimeError: injected fault" in err.details()
        for k in ("b", "c"):
            got = outcome[k]
            assert not isinstance(got, grpc.RpcError), got
            assert [d.reason for d in got.dones] == [pb.UtteranceDone.CAP]
            assert len(got.pcm(0)) > 0
        engine = srv.server.runtime.require_engine()
        assert wait_for(lambda: engine.live_sessions == 0 and engine.free_slots == 4, 10)
    finally:
        srv.stop()


def test_text_after_generation_ended_is_not_spoken_and_the_engine_lives_on(ckpt: Checkpoint) -> None:
    """Generation may end (EOS, or max_new_tokens) before the text does: the rest of that
    utterance's text is dropped, its end waits for the flush (and echoes its client id),
    and nothing else is disturbed (this once stopped the device worker)."""
    voice = voice_prompt(ckpt, speaker=ckpt.config.speakers[0])
    engine = Engine(ckpt, EngineConfig(max_sessions=2))
    try:
        s = engine.open_session(voice, "english", SamplingParams.greedy(max_new_tokens=2))
        s.push_text("Hello there, a sentence.")
        assert wait_for(lambda: any(isinstance(m, PcmPacket) for m in list(s.out._items)), 30)
        assert wait_for(lambda: engine.free_slots == 2, 30)  # generation over, the slot is free
        s.push_text(" More text for the same utterance.")
        s.flush("first")
        s.push_text("The next one.")
        s.end_text()
        msgs = list(s.messages(timeout=60))
        assert not any(isinstance(m, SessionError) for m in msgs), msgs
        dones = [m for m in msgs if isinstance(m, UtteranceDone)]
        assert [(d.utterance_id, d.client_id) for d in dones] == [(0, "first"), (1, "")]
        assert isinstance(msgs[-1], SessionClosed)
        codes, err = run(engine.open_session(voice, "english", GREEDY), TEXTS["b"])
        assert err is None and len(codes) > 0
    finally:
        engine.shutdown()
