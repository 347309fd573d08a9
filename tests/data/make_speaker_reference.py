"""Regenerates ``speaker_reference.npz`` and ``speaker_encoder_official_keys.json``.

Not part of the test run. It needs the official ``qwen_tts`` sources and librosa, which
the project's environment does not have; run it in a separate environment, e.g.

    PYTHONPATH=/path/to/qwen_tts_parent:. python tests/data/make_speaker_reference.py

(``qwen_tts`` must be importable as a package: its top-level modules that need sox,
onnxruntime or torchaudio are stubbed below; only the speaker encoder and mel code run.)
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

for _name in ("sox", "onnxruntime", "torchaudio", "torchaudio.compliance", "torchaudio.compliance.kaldi"):
    try:
        __import__(_name)
    except ImportError:
        _mod = types.ModuleType(_name)
        _mod.__spec__ = importlib.machinery.ModuleSpec(_name, None)
        _mod.__path__ = []
        sys.modules[_name] = _mod

import librosa  # noqa: E402
from qwen_tts.core.models import modeling_qwen3_tts as official  # noqa: E402
from qwen_tts.core.models.configuration_qwen3_tts import Qwen3TTSSpeakerEncoderConfig  # noqa: E402

from qwen3tts_rt.model.fabricate import init_random_speaker_encoder_  # noqa: E402
from qwen3tts_rt.model.speaker import SpeakerEncoder, SpeakerEncoderConfig  # noqa: E402

HERE = Path(__file__).parent


def reference_wav() -> np.ndarray:
    """0.25 s at 24 kHz, int16: two tones and noise (quantised, so exact in any dtype)."""
    rng = np.random.default_rng(1234)
    t = np.arange(6000) / 24000
    x = (
        0.3 * np.sin(2 * np.pi * 220 * t)
        + 0.2 * np.sin(2 * np.pi * 3100 * t)
        + 0.05 * rng.standard_normal(6000)
    )
    return np.round(x * 32767).astype(np.int16)


def main() -> None:
    fb = librosa.filters.mel(sr=24000, n_fft=1024, n_mels=128, fmin=0, fmax=12000)  # [128, 513]
    rows, cols = np.nonzero(fb)

    wav16 = reference_wav()
    wav = torch.from_numpy(wav16.astype(np.float32) / 32768.0)[None]  # [1, S]
    mel = official.mel_spectrogram(
        wav, n_fft=1024, num_mels=128, sampling_rate=24000, hop_size=256, win_size=1024, fmin=0, fmax=12000
    )  # [1, 128, frames]

    cfg = SpeakerEncoderConfig.tiny(enc_dim=64)
    ours = init_random_speaker_encoder_(SpeakerEncoder(cfg), seed=0)
    ref = official.Qwen3TTSSpeakerEncoder(Qwen3TTSSpeakerEncoderConfig(**cfg.to_dict())).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        emb = ref(mel.transpose(1, 2))[0]  # [64]

    np.savez_compressed(
        HERE / "speaker_reference.npz",
        filterbank_rows=rows.astype(np.int16),
        filterbank_cols=cols.astype(np.int16),
        filterbank_values=fb[rows, cols].astype(np.float32),
        wav_int16=wav16,
        official_mel=mel[0].numpy().astype(np.float32),
        official_tiny_embedding=emb.numpy().astype(np.float32),
    )
    real = official.Qwen3TTSSpeakerEncoder(Qwen3TTSSpeakerEncoderConfig(enc_dim=1024))
    keys = {k: list(v.shape) for k, v in real.state_dict().items()}
    lines = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in keys.items())
    (HERE / "speaker_encoder_official_keys.json").write_text("{\n" + lines + "\n}\n")
    print(f"filterbank nonzeros {rows.size}, mel {tuple(mel.shape)}, keys {len(keys)}")


if __name__ == "__main__":
    main()
