"""Helpers of the framework-plugin and OpenAI-endpoint tests: a tiny CustomVoice
checkpoint with short utterances, holding the engine at a given tick (so that "mid-reply"
is a fact of order, not of timing), the server's utterance counters, polling."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from qwen3tts_rt.engine.engine import Engine
from qwen3tts_rt.model.checkpoint import Checkpoint, load_checkpoint

MAX_FRAMES = 40  # frames per utterance (3.2 s of audio): the tests stay fast on 2 cores


def short_custom_voice(
    tiny_checkpoint: Callable[..., Path], tmp: Path, max_frames: int = MAX_FRAMES
) -> Checkpoint:
    """The tiny CustomVoice checkpoint with greedy defaults and ``max_new_tokens`` such that
    an utterance has at most ``max_frames`` frames (clients that cannot ask for sampling
    settings, like the frameworks and the OpenAI API, get these defaults)."""
    src = tiny_checkpoint("custom_voice", 0, greedy_defaults=True)
    d = tmp / f"custom-{max_frames}"
    if not d.exists():
        shutil.copytree(src, d)
        path = d / "generation_config.json"
        gen = json.loads(path.read_text())
        gen["max_new_tokens"] = max_frames + 1  # the cap is max_new_tokens - 1 frames
        path.write_text(json.dumps(gen, indent=2))
    return load_checkpoint(d)


def utterances(api: str, *reasons: str) -> float:
    """``qwen3tts_utterances_total{api}`` summed over ``reasons`` (default: all)."""
    from prometheus_client import REGISTRY

    return sum(
        REGISTRY.get_sample_value("qwen3tts_utterances_total", {"api": api, "reason": r}) or 0.0
        for r in (reasons or ("eos", "cap", "cancelled"))
    )


class EngineHold:
    """Stops the engine's device thread after its ``tick``-th tick (counted from entry)
    until ``release()``: an utterance started inside cannot end before the release."""

    def __init__(self, engine: Engine, tick: int) -> None:
        self.engine = engine
        self.tick = tick
        self.held = threading.Event()
        self._release = threading.Event()
        self._ticks = 0
        self._before = engine.on_tick

    def _on_tick(self, batch: int, seconds: float) -> None:
        if self._before is not None:
            self._before(batch, seconds)
        self._ticks += 1
        if self._ticks == self.tick:
            self.held.set()
            self._release.wait(120)

    def release(self) -> None:
        self._release.set()

    def __enter__(self) -> EngineHold:
        self.engine.on_tick = self._on_tick
        return self

    def __exit__(self, *exc: object | TracebackType | None) -> None:
        self.release()
        self.engine.on_tick = self._before


async def until(pred: Callable[[], bool], timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
