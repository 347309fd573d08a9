"""Speaker encoder: 128-bin log-mel of 24 kHz audio -> ECAPA-TDNN -> x-vector.

The x-vector conditions the talker in voice cloning (it is one position of the codec
prefix), so ``enc_dim`` always equals the talker hidden size (1024 for 0.6B, 2048 for 1.7B).

Parameter names match the official checkpoint, which stores them under the prefix
``speaker_encoder.``; ``SpeakerEncoder`` holds them without the prefix:

    blocks.0.conv                       initial TDNN (mel_dim -> C0, kernel k0)
    blocks.{i}.tdnn1.conv               SE-Res2Net block i = 1 .. n-2: 1x1 in
    blocks.{i}.res2net_block.blocks.{j} dilated convs of the Res2Net split, j < scale-1
    blocks.{i}.tdnn2.conv               1x1 out
    blocks.{i}.se_block.conv1 / conv2   squeeze-excitation
    mfa.conv                            multi-layer feature aggregation
    asp.tdnn.conv / asp.conv            attentive statistics pooling
    fc                                  pooled statistics -> enc_dim

Every convolution pads "same" with reflection, as the official encoder does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The mel front end of the official ``extract_speaker_embedding`` (call-site constants there,
# not config fields).
MEL_SAMPLE_RATE = 24000
MEL_N_FFT = 1024
MEL_N_MELS = 128
MEL_HOP = 256
MEL_WIN = 1024
MEL_FMIN = 0.0
MEL_FMAX = 12000.0
MEL_LOG_FLOOR = 1e-5  # magnitudes are clamped to this before the natural log
_MAG_EPS = 1e-9  # added to |X|^2 before the square root

_STATS_EPS = 1e-12  # variance floor in attentive statistics pooling


# --------------------------------------------------------------------------- config


@dataclass
class SpeakerEncoderConfig:
    """``speaker_encoder_config`` of the official config.json.

    The defaults are the official class defaults; the published config.json lists only
    the fields that differ from them (notably ``enc_dim``), so ``from_dict`` fills the rest.
    """

    mel_dim: int = 128
    enc_dim: int = 1024
    enc_channels: list[int] = field(default_factory=lambda: [512, 512, 512, 512, 1536])
    enc_kernel_sizes: list[int] = field(default_factory=lambda: [5, 3, 3, 3, 1])
    enc_dilations: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 1])
    enc_attention_channels: int = 128
    enc_res2net_scale: int = 8
    enc_se_channels: int = 128
    sample_rate: int = 24000

    def __post_init__(self) -> None:
        self.enc_channels = [int(c) for c in self.enc_channels]
        self.enc_kernel_sizes = [int(k) for k in self.enc_kernel_sizes]
        self.enc_dilations = [int(d) for d in self.enc_dilations]
        n = len(self.enc_channels)
        if n < 3 or len(self.enc_kernel_sizes) != n or len(self.enc_dilations) != n:
            raise ValueError(
                "speaker encoder: enc_channels, enc_kernel_sizes and enc_dilations must have the same "
                f"length (>= 3), got {self.enc_channels}, {self.enc_kernel_sizes}, {self.enc_dilations}"
            )
        if sum(self.enc_channels[1:-1]) != self.enc_channels[-1]:
            raise ValueError(
                "speaker encoder: enc_channels[-1] must equal the sum of the SE-Res2Net channels "
                f"enc_channels[1:-1] (they are concatenated), got {self.enc_channels}"
            )
        for c in self.enc_channels[1:-1]:
            if c % self.enc_res2net_scale:
                raise ValueError(
                    f"speaker encoder: channel count {c} is not divisible by enc_res2net_scale "
                    f"{self.enc_res2net_scale}"
                )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpeakerEncoderConfig:
        """Build from a config.json section; missing keys take the official defaults and
        keys that are not encoder fields (PretrainedConfig bookkeeping) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def tiny(cls, enc_dim: int = 64) -> SpeakerEncoderConfig:
        """A few-hundred-kB encoder for tests; ``enc_dim`` must equal the talker hidden size."""
        return cls(
            mel_dim=128,
            enc_dim=enc_dim,
            enc_channels=[32, 32, 32, 32, 96],
            enc_kernel_sizes=[5, 3, 3, 3, 1],
            enc_dilations=[1, 2, 3, 4, 1],
            enc_attention_channels=16,
            enc_res2net_scale=4,
            enc_se_channels=16,
            sample_rate=24000,
        )


# --------------------------------------------------------------------------- layers


class TDNNBlock(nn.Module):
    """Dilated 1-D convolution ("same" reflection padding) followed by ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.conv = _same_conv(in_ch, out_ch, kernel_size, dilation)
        self.activation = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:  # [B, Cin, T] -> [B, Cout, T]
        return self.activation(self.conv(x))


class Res2NetBlock(nn.Module):
    """Splits channels into ``scale`` groups; group 0 passes through, group j >= 1 is
    convolved after adding the previous group's output (hierarchical receptive field)."""

    def __init__(self, channels: int, scale: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        width = channels // scale
        self.scale = scale
        self.blocks = nn.ModuleList(TDNNBlock(width, width, kernel_size, dilation) for _ in range(scale - 1))

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T] -> [B, C, T]
        parts = x.chunk(self.scale, dim=1)
        outs = [parts[0]]
        prev: Tensor | None = None
        for part, block in zip(parts[1:], self.blocks):
            prev = block(part if prev is None else part + prev)
            outs.append(prev)
        return torch.cat(outs, dim=1)


class SEBlock(nn.Module):
    """Squeeze-excitation: channel gates from the time-averaged features."""

    def __init__(self, channels: int, se_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, se_channels, kernel_size=1)
        self.conv2 = nn.Conv1d(se_channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T] -> [B, C, T]
        s = x.mean(dim=2, keepdim=True)  # [B, C, 1]
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(s))))  # [B, C, 1]
        return x * gate


class SERes2NetBlock(nn.Module):
    """1x1 TDNN -> Res2Net -> 1x1 TDNN -> SE, with a residual connection."""

    def __init__(
        self, in_ch: int, out_ch: int, scale: int, se_channels: int, kernel_size: int, dilation: int
    ) -> None:
        super().__init__()
        if in_ch != out_ch:
            raise ValueError(f"SE-Res2Net residual needs in == out channels, got {in_ch} -> {out_ch}")
        self.tdnn1 = TDNNBlock(in_ch, out_ch, 1, 1)
        self.res2net_block = Res2NetBlock(out_ch, scale, kernel_size, dilation)
        self.tdnn2 = TDNNBlock(out_ch, out_ch, 1, 1)
        self.se_block = SEBlock(out_ch, se_channels)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T] -> [B, C, T]
        h = self.tdnn2(self.res2net_block(self.tdnn1(x)))
        return x + self.se_block(h)


class AttentiveStatsPool(nn.Module):
    """Channel-wise attentive mean and standard deviation over time.

    The attention sees each frame together with the utterance's global mean and std.
    All frames are valid (the official encoder has no padding mask).
    """

    def __init__(self, channels: int, attention_channels: int) -> None:
        super().__init__()
        self.tdnn = TDNNBlock(3 * channels, attention_channels, 1, 1)
        self.conv = nn.Conv1d(attention_channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T] -> [B, 2C]
        t = x.shape[2]
        uniform = x.new_full((1, 1, t), 1.0 / t)  # [1, 1, T]
        mean, std = _weighted_stats(x, uniform)  # [B, C] each
        ctx = torch.cat([x, mean.unsqueeze(2).expand_as(x), std.unsqueeze(2).expand_as(x)], dim=1)
        weights = torch.softmax(self.conv(torch.tanh(self.tdnn(ctx))), dim=2)  # [B, C, T]
        mean, std = _weighted_stats(x, weights)
        return torch.cat([mean, std], dim=1)


def _weighted_stats(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std of ``x`` [B, C, T] over time under weights ``w`` that sum to 1 over T."""
    mean = (w * x).sum(dim=2)  # [B, C]
    var = (w * (x - mean.unsqueeze(2)).pow(2)).sum(dim=2)
    return mean, var.clamp(min=_STATS_EPS).sqrt()


def _same_conv(in_ch: int, out_ch: int, kernel_size: int, dilation: int) -> nn.Conv1d:
    if kernel_size == 1:  # "same" needs no padding for a 1x1 convolution
        return nn.Conv1d(in_ch, out_ch, kernel_size=1)
    return nn.Conv1d(in_ch, out_ch, kernel_size, dilation=dilation, padding="same", padding_mode="reflect")


# --------------------------------------------------------------------------- encoder


class SpeakerEncoder(nn.Module):
    """ECAPA-TDNN x-vector extractor (Desplanques et al. 2020) in the official layout.

    ``forward`` takes channel-first mels [B, mel_dim, T] (what ``mel_spectrogram`` returns;
    the official module takes [B, T, mel_dim] and transposes) and returns [B, enc_dim].
    """

    def __init__(self, config: SpeakerEncoderConfig) -> None:
        super().__init__()
        self.config = config
        ch, ks, dil = config.enc_channels, config.enc_kernel_sizes, config.enc_dilations
        self.blocks = nn.ModuleList([TDNNBlock(config.mel_dim, ch[0], ks[0], dil[0])])
        for i in range(1, len(ch) - 1):
            self.blocks.append(
                SERes2NetBlock(
                    ch[i - 1], ch[i], config.enc_res2net_scale, config.enc_se_channels, ks[i], dil[i]
                )
            )
        # the official sizes the aggregation layer's input as enc_channels[-1]; the config
        # checks that this equals the concatenated SE-Res2Net outputs
        self.mfa = TDNNBlock(ch[-1], ch[-1], ks[-1], dil[-1])
        self.asp = AttentiveStatsPool(ch[-1], config.enc_attention_channels)
        self.fc = nn.Conv1d(2 * ch[-1], config.enc_dim, kernel_size=1)

    def forward(self, mels: Tensor) -> Tensor:  # [B, mel_dim, T] -> [B, enc_dim]
        h = self.blocks[0](mels)  # [B, C0, T]
        feats = []
        for block in self.blocks[1:]:
            h = block(h)
            feats.append(h)
        h = self.mfa(torch.cat(feats, dim=1))  # [B, C_last, T]
        pooled = self.asp(h)  # [B, 2 * C_last]
        return self.fc(pooled.unsqueeze(2)).squeeze(2)  # [B, enc_dim]


# --------------------------------------------------------------------------- mel front end


def _hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
    """Slaney's auditory-toolbox mel scale: linear below 1 kHz, logarithmic above."""
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz / f_sp
    above = hz >= min_log_hz
    mel[above] = min_log_mel + np.log(hz[above] / min_log_hz) / logstep
    return mel


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    mel = np.asarray(mel, dtype=np.float64)
    hz = mel * f_sp
    above = mel >= min_log_mel
    hz[above] = min_log_hz * np.exp(logstep * (mel[above] - min_log_mel))
    return hz


@functools.lru_cache(maxsize=8)
def mel_filterbank(
    sample_rate: int = MEL_SAMPLE_RATE,
    n_fft: int = MEL_N_FFT,
    n_mels: int = MEL_N_MELS,
    fmin: float = MEL_FMIN,
    fmax: float = MEL_FMAX,
) -> np.ndarray:
    """Triangular mel filters on the Slaney scale with Slaney area normalisation,
    float32 [n_mels, n_fft // 2 + 1] (the filterbank librosa builds by default)."""
    fft_hz = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)  # [F]
    edges_mel = np.linspace(
        _hz_to_mel_slaney(np.array([fmin]))[0], _hz_to_mel_slaney(np.array([fmax]))[0], n_mels + 2
    )
    edges_hz = _mel_to_hz_slaney(edges_mel)  # [n_mels + 2]
    lo, centre, hi = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]  # [n_mels, 1]
    rising = (fft_hz[None, :] - lo) / (centre - lo)
    falling = (hi - fft_hz[None, :]) / (hi - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))  # [n_mels, F]
    weights *= 2.0 / (hi - lo)  # equal area per filter
    out = weights.astype(np.float32)
    out.flags.writeable = False  # shared through the cache
    return out


@functools.lru_cache(maxsize=8)
def _mel_constants(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    basis = torch.tensor(mel_filterbank(), device=device, dtype=dtype)  # [M, F]
    window = torch.hann_window(MEL_WIN, periodic=True, device=device, dtype=dtype)  # [MEL_WIN]
    return basis, window


def mel_spectrogram(wav: Tensor) -> Tensor:
    """Log-mel spectrogram of 24 kHz audio as the official speaker front end computes it.

    n_fft 1024, Hann window 1024, hop 256, 128 Slaney mels over 0..12 kHz; the signal is
    reflection-padded by (n_fft - hop) / 2 = 384 on each side and framed without centring,
    so S samples give (S - 256) // 256 + 1 frames; magnitude sqrt(|X|^2 + 1e-9);
    natural log after clamping at 1e-5.

    wav: [B, S] float -> [B, 128, frames] (float32 unless ``wav`` is float64).
    """
    if wav.dim() != 2:
        raise ValueError(f"mel_spectrogram expects [B, S], got shape {tuple(wav.shape)}")
    pad = (MEL_N_FFT - MEL_HOP) // 2
    if wav.shape[1] <= pad:
        raise ValueError(f"mel_spectrogram needs more than {pad} samples, got {wav.shape[1]}")
    if not wav.is_floating_point():
        raise ValueError(f"mel_spectrogram expects float samples, got {wav.dtype}")
    if wav.dtype not in (torch.float32, torch.float64):
        wav = wav.float()
    basis, window = _mel_constants(wav.device, wav.dtype)  # [M, F], [MEL_WIN]
    x = F.pad(wav.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)  # [B, S + 2 * pad]
    spec = torch.stft(
        x,
        MEL_N_FFT,
        hop_length=MEL_HOP,
        win_length=MEL_WIN,
        window=window,
        center=False,
        normalized=False,
        onesided=True,
        return_complex=True,
    )  # [B, F, frames]
    mag = (torch.view_as_real(spec).pow(2).sum(-1) + _MAG_EPS).sqrt()  # [B, F, frames]
    mel = torch.matmul(basis, mag)  # [B, M, frames]
    return mel.clamp(min=MEL_LOG_FLOOR).log()


# --------------------------------------------------------------------------- embedding


@torch.inference_mode()
def extract_speaker_embedding(
    encoder: SpeakerEncoder,
    wav24k: np.ndarray | Tensor,
    device: torch.device | str,
    dtype: torch.dtype,
) -> Tensor:
    """x-vector of one mono 24 kHz waveform [S] (float, nominally in [-1, 1]) -> [enc_dim].

    The mel is computed in float32 on ``device``; the encoder runs in ``dtype`` on ``device``
    (the official computes the mel on CPU; both agree to float32 rounding).
    The encoder must already live on ``device`` in ``dtype``.
    """
    wav = torch.from_numpy(np.ascontiguousarray(wav24k)) if isinstance(wav24k, np.ndarray) else wav24k
    if wav.dim() != 1:
        raise ValueError(f"extract_speaker_embedding expects a mono waveform [S], got {tuple(wav.shape)}")
    wav = wav.to(device=device, dtype=torch.float32)
    mels = mel_spectrogram(wav.unsqueeze(0))  # [1, 128, frames]
    return encoder(mels.to(dtype))[0]  # [enc_dim]
