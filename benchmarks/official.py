"""Run baseline (b), the official qwen-tts package, in its own venv as a subprocess
(``benchmarks/official_runner.py``); the venv is made by ``tests/reference/ref_venv.sh``
(the same one ``make reference`` uses)."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def reference_python() -> Path:
    """The reference venv's python, creating the venv on first use (about a minute)."""
    out = subprocess.run(
        ["bash", str(ROOT / "tests" / "reference" / "ref_venv.sh")],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return ROOT / out.stdout.strip().splitlines()[-1]


def run_official(
    model: str | Path,
    utterances: list[dict[str, str]],
    *,
    ref_audio: np.ndarray,
    max_new_tokens: int,
    greedy: bool,
    device: str,
    dtype: str,
    threads: int | None,
    runs: int,
    timeout_s: float = 3600,
) -> dict[str, Any]:
    """The official package's whole generate + decode for each utterance (after one warm-up
    call), timed in its own process. Returns the runner's JSON (see official_runner.py)."""
    py = reference_python()
    with tempfile.TemporaryDirectory(prefix="bench-official-") as tmp:
        t = Path(tmp)
        np.save(t / "ref.npy", ref_audio.astype(np.float32))
        job = {
            "model": str(Path(model).resolve()),
            "device": device,
            "dtype": dtype,
            "threads": threads,
            "ref_audio_npy": str(t / "ref.npy"),
            "max_new_tokens": max_new_tokens,
            "greedy": greedy,
            "runs": runs,
            "utterances": utterances,
        }
        (t / "job.json").write_text(json.dumps(job))
        proc = subprocess.run(
            [
                str(py),
                str(ROOT / "benchmarks" / "official_runner.py"),
                str(t / "job.json"),
                str(t / "out.json"),
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=ROOT,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"the official package failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
            )
        result: dict[str, Any] = json.loads((t / "out.json").read_text())
        return result
