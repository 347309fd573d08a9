"""Made-up checkpoints and the synthetic voice: serving code never imports the fabrication
module, and the synthetic voice is the one the reference data was made with."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from qwen3tts_rt.synthetic import synthetic_speech

PACKAGE = Path(__file__).resolve().parents[1] / "qwen3tts_rt"
FABRICATE = "qwen3tts_rt.model.fabricate"
# Commands that make checkpoints on request (`qwen3tts-rt make-checkpoint`) may import it.
ALLOWED = {PACKAGE / "cli.py", PACKAGE / "model" / "fabricate.py"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_serving_code_does_not_import_the_fabrication_module() -> None:
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in sorted(PACKAGE.rglob("*.py"))
        if p not in ALLOWED and FABRICATE in _imports(p)
    ]
    assert offenders == []
    assert FABRICATE in _imports(PACKAGE / "cli.py")  # the check looks at the right name


def test_synthetic_speech_is_the_reference_recording() -> None:
    """tests/reference cloned this very signal with the official package."""
    ref = np.load(Path(__file__).parent / "reference" / "data" / "ref_audio.npy")
    np.testing.assert_array_equal(synthetic_speech(len(ref) / 24000), ref)


def test_synthetic_speech_shape_level_and_seed() -> None:
    x = synthetic_speech(0.5, 16000)
    assert x.shape == (8000,) and x.dtype == np.float32
    assert 0.2 < np.abs(x).max() < 0.3 and np.isfinite(x).all()
    assert np.array_equal(x, synthetic_speech(0.5, 16000))
    assert not np.array_equal(x, synthetic_speech(0.5, 16000, seed=1))
    assert not np.array_equal(x, synthetic_speech(0.5, 16000, pitch=200.0))


@pytest.mark.parametrize(
    ("seconds", "rate", "pitch", "match"),
    [
        (0.0, 24000, 140.0, "at least one sample"),
        (1.0, 24000, 0.0, "pitch"),
        (1.0, 4000, 300.0, "below 2000 Hz"),
    ],
)
def test_synthetic_speech_rejects_bad_arguments(seconds: float, rate: int, pitch: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        synthetic_speech(seconds, rate, pitch=pitch)
