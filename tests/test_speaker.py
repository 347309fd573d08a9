"""Speaker encoder and its mel front end.

``tests/data/speaker_reference.npz`` and ``speaker_encoder_official_keys.json`` were written
by ``tests/data/make_speaker_reference.py`` from librosa 0.11 and the official ``qwen_tts``
code: librosa's mel filterbank (sparse), the official log-mel of a 0.25 s signal, the official
encoder's output for the tiny config with ``init_random_speaker_encoder_(seed=0)`` weights,
and the official parameter names and shapes for the real 0.6B config.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen3tts_rt.model.fabricate import init_random_speaker_encoder_
from qwen3tts_rt.model.speaker import (
    SpeakerEncoder,
    SpeakerEncoderConfig,
    extract_speaker_embedding,
    mel_filterbank,
    mel_spectrogram,
)

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(DATA / "speaker_reference.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def tiny() -> SpeakerEncoder:
    return init_random_speaker_encoder_(SpeakerEncoder(SpeakerEncoderConfig.tiny(enc_dim=64)), seed=0).eval()


def ref_wav(ref: dict[str, np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(ref["wav_int16"].astype(np.float32) / 32768.0)  # [S]


def signal(seconds: float, f0: float, seed: int) -> np.ndarray:
    t = np.arange(round(seconds * 24000)) / 24000
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * f0 * t) + 0.05 * noise).astype(np.float32)


# --------------------------------------------------------------------------- mel


def test_filterbank_matches_librosa(ref: dict[str, np.ndarray]) -> None:
    expected = np.zeros((128, 513), np.float32)
    expected[ref["filterbank_rows"], ref["filterbank_cols"]] = ref["filterbank_values"]
    fb = mel_filterbank()
    assert fb.shape == (128, 513) and fb.dtype == np.float32
    assert np.abs(fb - expected).max() < 1e-6
    assert np.array_equal(fb != 0, expected != 0)  # the same support


def test_mel_matches_official(ref: dict[str, np.ndarray]) -> None:
    mel = mel_spectrogram(ref_wav(ref)[None])[0]  # [128, frames]
    assert mel.shape == ref["official_mel"].shape == (128, 23)
    np.testing.assert_allclose(mel.numpy(), ref["official_mel"], rtol=0, atol=1e-5)


def test_mel_matches_a_slow_numpy_computation() -> None:
    x = signal(0.5, 440.0, seed=3)
    pad = (1024 - 256) // 2
    padded = np.pad(x.astype(np.float64), pad, mode="reflect")
    n = np.arange(1024)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / 1024)  # periodic Hann
    frames = (padded.size - 1024) // 256 + 1
    mag = np.stack(
        [np.abs(np.fft.rfft(padded[i * 256 : i * 256 + 1024] * window)) for i in range(frames)], axis=1
    )  # [513, frames]
    expected = np.log(np.maximum(mel_filterbank().astype(np.float64) @ np.sqrt(mag**2 + 1e-9), 1e-5))
    got = mel_spectrogram(torch.from_numpy(x)[None])[0].numpy()
    assert got.shape == expected.shape == (128, (x.size - 256) // 256 + 1)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_mel_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        mel_spectrogram(torch.zeros(1000))
    with pytest.raises(ValueError, match="more than 384 samples"):
        mel_spectrogram(torch.zeros(1, 300))


# --------------------------------------------------------------------------- encoder layout


def test_state_dict_matches_official_layout() -> None:
    expected = json.loads((DATA / "speaker_encoder_official_keys.json").read_text())
    enc = SpeakerEncoder(SpeakerEncoderConfig.from_dict({"enc_dim": 1024}))
    got = {k: list(v.shape) for k, v in enc.state_dict().items()}
    assert got == expected
    assert list(got) == list(expected)  # same order, too
    big = SpeakerEncoder(SpeakerEncoderConfig(enc_dim=2048))
    assert big.state_dict()["fc.weight"].shape == (2048, 3072, 1)


def test_tiny_encoder_matches_official_output(ref: dict[str, np.ndarray], tiny: SpeakerEncoder) -> None:
    mel = torch.from_numpy(ref["official_mel"])[None]  # [1, 128, T]
    with torch.no_grad():
        emb = tiny(mel)[0]
    expected = ref["official_tiny_embedding"]
    np.testing.assert_allclose(emb.numpy(), expected, rtol=0, atol=1e-5 * float(np.abs(expected).max()))


# --------------------------------------------------------------------------- behaviour


def test_embedding_shape_dtype_and_determinism(tiny: SpeakerEncoder) -> None:
    wav = signal(1.0, 200.0, seed=0)
    a = extract_speaker_embedding(tiny, wav, "cpu", torch.float32)
    b = extract_speaker_embedding(tiny, torch.from_numpy(wav), torch.device("cpu"), torch.float32)
    assert a.shape == (64,) and a.dtype == torch.float32
    assert torch.equal(a, b)
    again = init_random_speaker_encoder_(SpeakerEncoder(SpeakerEncoderConfig.tiny(enc_dim=64)), seed=0).eval()
    assert torch.equal(extract_speaker_embedding(again, wav, "cpu", torch.float32), a)


def test_batch_is_consistent_with_single_items(tiny: SpeakerEncoder) -> None:
    wavs = torch.stack(
        [torch.from_numpy(signal(1.0, f, seed=i)) for i, f in enumerate((150.0, 220.0, 330.0))]
    )
    with torch.no_grad():
        mels = mel_spectrogram(wavs)  # [3, 128, T]
        batch = tiny(mels)  # [3, 64]
        singles = torch.cat([tiny(mels[i : i + 1]) for i in range(3)])
        emb0 = extract_speaker_embedding(tiny, wavs[0], "cpu", torch.float32)
    torch.testing.assert_close(batch, singles, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch[0], emb0, rtol=1e-5, atol=1e-6)


def test_random_init_gives_finite_distinct_embeddings() -> None:
    enc = SpeakerEncoder(SpeakerEncoderConfig.tiny(enc_dim=32)).eval()
    state = torch.random.get_rng_state()
    init_random_speaker_encoder_(enc, seed=7)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
    embs = torch.stack(
        [
            extract_speaker_embedding(enc, signal(1.5, f, seed=i), "cpu", torch.float32)
            for i, f in enumerate((110.0, 250.0, 900.0))
        ]
    )
    assert torch.isfinite(embs).all()
    dists = torch.cdist(embs, embs)
    assert (dists + torch.eye(3) * 1e9).min() > 1e-3 * embs.norm(dim=1).mean()
    other = init_random_speaker_encoder_(SpeakerEncoder(SpeakerEncoderConfig.tiny(enc_dim=32)), seed=8)
    assert not torch.equal(other.fc.weight, enc.fc.weight)


def test_bfloat16_runs_close_to_float32(tiny: SpeakerEncoder) -> None:
    wav = signal(1.0, 300.0, seed=5)
    ref32 = extract_speaker_embedding(tiny, wav, "cpu", torch.float32)
    enc16 = init_random_speaker_encoder_(SpeakerEncoder(SpeakerEncoderConfig.tiny(enc_dim=64)), seed=0)
    emb16 = extract_speaker_embedding(enc16.to(torch.bfloat16).eval(), wav, "cpu", torch.bfloat16)
    assert emb16.dtype == torch.bfloat16
    assert float((emb16.float() - ref32).abs().max()) < 0.05 * float(ref32.abs().max())


def test_extract_rejects_multichannel(tiny: SpeakerEncoder) -> None:
    with pytest.raises(ValueError, match="mono"):
        extract_speaker_embedding(tiny, np.zeros((2, 24000), np.float32), "cpu", torch.float32)


# --------------------------------------------------------------------------- config


def test_config_dict_round_trip_and_defaults() -> None:
    real = SpeakerEncoderConfig.from_dict({"enc_dim": 2048, "sample_rate": 24000, "model_type": "x"})
    assert real.enc_dim == 2048 and real.enc_channels == [512, 512, 512, 512, 1536]
    assert real.mel_dim == 128 and real.enc_res2net_scale == 8
    assert SpeakerEncoderConfig.from_dict(real.to_dict()) == real
    assert SpeakerEncoderConfig.tiny(enc_dim=48).enc_dim == 48


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="same length"):
        SpeakerEncoderConfig(enc_kernel_sizes=[5, 3, 3, 1])
    with pytest.raises(ValueError, match="sum of the SE-Res2Net channels"):
        SpeakerEncoderConfig(enc_channels=[512, 512, 512, 512, 1024])
    with pytest.raises(ValueError, match="divisible"):
        SpeakerEncoderConfig(enc_channels=[30, 30, 30, 30, 90], enc_res2net_scale=8)
