"""Shared fixtures. Checkpoints are built once per test session (random weights,
official layout) and shared by every test file."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen3tts_rt.audio import write_wav
from qwen3tts_rt.model.checkpoint import Checkpoint, load_checkpoint
from qwen3tts_rt.model.fabricate import make_checkpoint
from qwen3tts_rt.synthetic import synthetic_speech
from tests.reference.checkpoints import build


@pytest.fixture(scope="session")
def ref_checkpoint_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny checkpoints of the reference data: tiny-base, tiny-custom, tiny-design."""
    return build(tmp_path_factory.mktemp("ckpts"))


# --------------------------------------------------------------------------- tiny checkpoints for any test


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_checkpoint(kind="base", seed=0, greedy_defaults=False) -> Path``: a tiny
    random-weight checkpoint in the official layout, built once per test session.
    ``greedy_defaults=True`` gives the same weights with a generation_config.json whose
    defaults are greedy (for clients that cannot ask for greedy decoding, e.g. Riva's)."""
    root = tmp_path_factory.mktemp("tiny")
    made: dict[tuple[str, int, bool], Path] = {}

    def get(kind: str = "base", seed: int = 0, greedy_defaults: bool = False) -> Path:
        key = (kind, seed, greedy_defaults)
        if key not in made:
            if greedy_defaults:
                src = get(kind, seed)
                d = root / f"{kind}-{seed}-greedy"
                shutil.copytree(src, d)
                gen_path = d / "generation_config.json"
                gen = json.loads(gen_path.read_text())
                gen.update(do_sample=False, subtalker_dosample=False)
                gen_path.write_text(json.dumps(gen, indent=2))
            else:
                d = make_checkpoint(root / f"{kind}-{seed}", preset="tiny", kind=kind, seed=seed)
            made[key] = d
        return made[key]

    return get


@pytest.fixture(scope="session")
def tiny_loaded(tiny_checkpoint: Callable[..., Path]) -> Callable[..., Checkpoint]:
    """``tiny_loaded(kind="base", seed=0, greedy_defaults=False) -> Checkpoint``, loaded once
    per test session (models are stateless: engines and tests may share them)."""
    loaded: dict[tuple[str, int, bool], Checkpoint] = {}

    def get(kind: str = "base", seed: int = 0, greedy_defaults: bool = False) -> Checkpoint:
        key = (kind, seed, greedy_defaults)
        if key not in loaded:
            loaded[key] = load_checkpoint(tiny_checkpoint(kind, seed, greedy_defaults))
        return loaded[key]

    return get


def speech_like(seconds: float = 2.0, rate: int = 24000, seed: int = 0) -> np.ndarray:
    """[S] float32: ``synthetic_speech`` whose pitch and noise follow ``seed`` (a different
    voice per seed)."""
    return synthetic_speech(seconds, rate, pitch=120.0 + 10.0 * (seed % 32), seed=seed)


@pytest.fixture(scope="session")
def speech_wav() -> Callable[..., bytes]:
    """``speech_wav(seconds=2.0, rate=24000, seed=0) -> bytes``: a 16-bit WAV file of
    speech-like sound (passes the reference-audio rules for voice cloning)."""

    def make(seconds: float = 2.0, rate: int = 24000, seed: int = 0) -> bytes:
        buf = io.BytesIO()
        write_wav(buf, speech_like(seconds, rate, seed), rate)
        return buf.getvalue()

    return make


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one intra-op thread (and do not fight other processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
