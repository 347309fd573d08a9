"""Full-size (0.6B-shaped) random checkpoint: loads and speaks on CPU. Slow: `make test-slow`."""

from __future__ import annotations

import numpy as np
import pytest

from qwen3tts_rt.api import Qwen3TTS
from qwen3tts_rt.model.fabricate import make_checkpoint

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("preset", ["0.6b"])
def test_full_size_checkpoint_synthesises(preset: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    d = make_checkpoint(tmp_path_factory.mktemp(preset), preset=preset, kind="base", seed=0)
    tts = Qwen3TTS.from_pretrained(str(d))
    cfg = tts.ckpt.config.talker.stack
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (1024, 28)
    rng = np.random.default_rng(0)
    ref = (0.1 * rng.standard_normal(24000 * 3)).astype(np.float32)
    prompt = tts.create_voice_clone_prompt(ref, x_vector_only_mode=True, sample_rate=24000)
    wavs, sr = tts.generate_voice_clone(
        "Hello.",
        "english",
        voice_clone_prompt=prompt,
        do_sample=False,
        subtalker_dosample=False,
        max_new_tokens=6,
    )
    assert sr == 24000 and len(wavs[0]) == 5 * 1920
    assert np.isfinite(wavs[0]).all() and np.abs(wavs[0]).max() > 1e-3
