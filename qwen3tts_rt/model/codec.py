"""The 12 Hz speech tokenizer ("codec") of Qwen3-TTS, with an exact streaming decoder.

* `CodecEncoder`: 24 kHz waveform -> 16 codebooks per 80 ms frame (transformers' Mimi blocks).
* `CodecDecoder`: codes -> waveform. Every stage is causal, so a stream carries each conv's left
  context and each attention layer's last `sliding_window - 1` keys/values in a `CodecDecoderState`
  and decodes only new frames; the concatenated packets equal the one-shot decode.

Parameter names follow the official checkpoint (`speech_tokenizer/model.safetensors` of a
Qwen3-TTS-12Hz model), so its weights load with strict=True and the official package loads ours.
The norms, RoPE and MLP of the pre-transformer are those of `qwen3tts_rt.model.layers`. Random
weights and the preset sizes for made-up checkpoints live in `qwen3tts_rt.model.fabricate`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import MimiConfig
from transformers.models.mimi.modeling_mimi import (
    MimiConv1d,
    MimiEncoder,
    MimiEuclideanCodebook,
    MimiResidualVectorQuantizer,
    MimiSplitResidualVectorQuantizer,
    MimiTransformerModel,
)

from qwen3tts_rt.errors import CheckpointError, UnsupportedOperationError
from qwen3tts_rt.model.layers import MLP, RMSNorm, RotaryEmbedding, apply_rope

MODEL_TYPE = "qwen3_tts_tokenizer_12hz"
ARCHITECTURE = "Qwen3TTSTokenizerV2Model"
_CODEBOOK_EPS = 1e-5
_SNAKE_EPS = 1e-9

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class CodecDecoderConfig:
    """`decoder_config` of `speech_tokenizer/config.json`.

    Defaults are the official class defaults, used only for keys a file leaves out; they are not
    the released sizes (see `qwen3tts_rt.model.fabricate.full_codec_config`). Unknown keys are
    kept in `extra` for round trips.
    """

    codebook_dim: int  # the official class has no default either
    codebook_size: int = 2048
    hidden_size: int = 1024
    latent_dim: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 8
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    attention_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int = 72  # a query sees itself and the previous sliding_window - 1 frames
    max_position_embeddings: int = 8000
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    layer_scale_initial_scale: float = 0.01
    num_quantizers: int = 16
    upsample_rates: tuple[int, ...] = (8, 5, 4, 3)
    upsampling_ratios: tuple[int, ...] = (2, 2)
    decoder_dim: int = 1536
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def samples_per_frame(self) -> int:
        return math.prod(self.upsampling_ratios) * math.prod(self.upsample_rates)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CodecDecoderConfig:
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        if "codebook_dim" not in known:
            raise ValueError("decoder_config has no codebook_dim")
        for key in ("upsample_rates", "upsampling_ratios"):
            if key in known:
                known[key] = tuple(known[key])
        config = cls(**known, extra={k: v for k, v in data.items() if k not in names})
        if config.hidden_act != "silu":
            raise ValueError(f"decoder hidden_act {config.hidden_act!r} is not supported (only 'silu')")
        return config

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or value is None:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass
class CodecConfig:
    """`speech_tokenizer/config.json`. `encoder` is the Mimi `encoder_config`, given to
    transformers' `MimiConfig` as is. Unknown top-level keys are kept in `extra`."""

    decoder: CodecDecoderConfig
    encoder: dict[str, Any] = field(default_factory=dict)
    encoder_valid_num_quantizers: int = 16
    input_sample_rate: int = 24000
    output_sample_rate: int = 24000
    decode_upsample_rate: int = 1920
    encode_downsample_rate: int = 1920
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.decoder.samples_per_frame != self.decode_upsample_rate:
            raise ValueError(
                f"decoder upsamples by {self.decoder.samples_per_frame} but decode_upsample_rate is "
                f"{self.decode_upsample_rate}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CodecConfig:
        if data.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(f"model_type {data['model_type']!r} is not {MODEL_TYPE!r}")
        if "decoder_config" not in data:
            raise ValueError("codec config has no decoder_config")
        scalars = {f.name for f in fields(cls)} - {"decoder", "encoder", "extra"}
        written = {"architectures", "model_type", "decoder_config", "encoder_config"}  # by to_dict
        return cls(
            decoder=CodecDecoderConfig.from_dict(data["decoder_config"]),
            encoder=dict(data.get("encoder_config") or {}),
            **{k: v for k, v in data.items() if k in scalars},
            extra={k: v for k, v in data.items() if k not in scalars and k not in written},
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> CodecConfig:
        return cls.from_dict(json.loads((_tokenizer_dir(path) / "config.json").read_text()))

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.extra,
            "architectures": [ARCHITECTURE],
            "model_type": MODEL_TYPE,
            "encoder_config": dict(self.encoder),
            "decoder_config": self.decoder.to_dict(),
            **{
                f.name: getattr(self, f.name)
                for f in fields(self)
                if f.name not in ("decoder", "encoder", "extra")
            },
        }

    def preprocessor_dict(self) -> dict[str, Any]:
        """`preprocessor_config.json`: the official wrapper loads a transformers feature extractor."""
        return {
            "chunk_length_s": None,
            "feature_extractor_type": "EncodecFeatureExtractor",
            "feature_size": 1,
            "overlap": None,
            "padding_side": "right",
            "padding_value": 0.0,
            "return_attention_mask": True,
            "sampling_rate": self.input_sample_rate,
        }


# ---------------------------------------------------------------------------------------------
# Decoder building blocks. Attribute names are the official ones (see the module docstring).
# ---------------------------------------------------------------------------------------------


class _ConvCarry:
    """Hands each causal conv its stored left context in call order and collects the new ones."""

    def __init__(self, history: list[Tensor]) -> None:
        self._old = iter(history)
        self.new: list[Tensor] = []

    def extend(self, x: Tensor, context: int) -> Tensor:
        """[B, C, t] -> [B, C, context + t]; keeps the last `context` frames for the next call."""
        x = torch.cat([next(self._old), x], dim=-1)
        self.new.append(x[..., x.shape[-1] - context :].clone())  # a copy: a view would pin all of x
        return x

    def finish(self) -> list[Tensor]:
        assert next(self._old, None) is None, "a stored conv context was not used"
        return self.new


class _CausalConv(nn.Module):
    """Stride-1 conv padded on the left only (official `Qwen3TTSTokenizerV2CausalConvNet`)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, dilation: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, dilation=dilation, groups=groups)
        self.context = (kernel - 1) * dilation

    def forward(self, x: Tensor, carry: _ConvCarry) -> Tensor:  # [B, C, t] -> [B, C', t]
        if self.context:
            x = carry.extend(x, self.context)
        return self.conv(x)


class _CausalConvTranspose(nn.Module):
    """Transposed conv whose right overhang is cut (official `Qwen3TTSTokenizerV2CausalTransConvNet`).

    A new frame's output strides also receive kernel tails of the `context` frames before it, so
    those frames are prepended and the strides they alone own (already emitted) are dropped.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(c_in, c_out, kernel, stride=stride)
        self.stride = stride
        self.context = math.ceil(kernel / stride) - 1

    def forward(self, x: Tensor, carry: _ConvCarry) -> Tensor:  # [B, C, t] -> [B, C', t * stride]
        t = x.shape[-1]
        if self.context:
            x = carry.extend(x, self.context)
        return self.conv(x)[..., self.context * self.stride : (self.context + t) * self.stride]


class _SnakeBeta(nn.Module):
    """x + sin²(x·e^alpha) / e^beta, per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T]
        alpha = self.alpha.exp()[None, :, None]
        beta = self.beta.exp()[None, :, None]
        return x + 1.0 / (beta + _SNAKE_EPS) * torch.sin(x * alpha).pow(2)


class _ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = _CausalConv(dim, dim, 7, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: Tensor, carry: _ConvCarry) -> Tensor:  # [B, C, T]
        h = self.dwconv(x, carry).transpose(1, 2)  # [B, T, C]
        h = self.pwconv2(F.gelu(self.pwconv1(self.norm(h))))
        return x + (self.gamma * h).transpose(1, 2)


class _UpsampleStage(nn.ModuleList):
    """Official `upsample[i]`: [transposed conv by `ratio`, ConvNeXt block]."""

    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__([_CausalConvTranspose(dim, dim, ratio, ratio), _ConvNeXtBlock(dim)])

    def forward(self, x: Tensor, carry: _ConvCarry) -> Tensor:
        for stage in self:
            x = stage(x, carry)
        return x


class _ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int) -> None:
        super().__init__()
        self.act1 = _SnakeBeta(dim)
        self.conv1 = _CausalConv(dim, dim, 7, dilation=dilation)
        self.act2 = _SnakeBeta(dim)
        self.conv2 = _CausalConv(dim, dim, 1)

    def forward(self, x: Tensor, carry: _ConvCarry) -> Tensor:  # [B, C, T]
        return x + self.conv2(self.act2(self.conv1(self.act1(x), carry)), carry)


class _DecoderBlock(nn.Module):
    """SnakeBeta, transposed conv upsampling by `rate`, three dilated residual units."""

    def __init__(self, c_in: int, c_out: int, rate: int) -> None:
        super().__init__()
        units = [_ResidualUnit(c_out, dilation) for dilation in (1, 3, 9)]
        self.block = nn.ModuleList(
            [_SnakeBeta(c_in), _CausalConvTranspose(c_in, c_out, 2 * rate, rate), *units]
        )

    def forward(self, x: Tensor, carry: _ConvCarry) -> Tensor:  # [B, C, T] -> [B, C', T * rate]
        x = self.block[0](x)
        for layer in self.block[1:]:
            x = layer(x, carry)
        return x


class _Codebook(nn.Module):
    """Entries stored as running sums: entry = embedding_sum / cluster_usage."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.cluster_usage = nn.Parameter(torch.ones(size))
        self.embedding_sum = nn.Parameter(torch.zeros(size, dim))

    def forward(self, codes: Tensor) -> Tensor:  # [B, T] -> [B, T, D]
        usage = self.cluster_usage.clamp(min=_CODEBOOK_EPS)[codes]  # [B, T]
        return F.embedding(codes, self.embedding_sum) / usage[..., None]


class _VectorQuantizer(nn.Module):
    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self._codebook = _Codebook(size, dim)

    def forward(self, codes: Tensor) -> Tensor:  # [B, T] -> [B, T, D]
        return self._codebook(codes)


class _QuantizerList(nn.Module):
    def __init__(self, n_q: int, size: int, dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_VectorQuantizer(size, dim) for _ in range(n_q))


class _ResidualVQ(nn.Module):
    """Sum of `n_q` codebook entries, projected to `io_dim`. `input_proj` only serves the
    (training-time) encoder direction; it is kept for the checkpoint layout."""

    def __init__(self, n_q: int, size: int, dim: int, io_dim: int) -> None:
        super().__init__()
        self.input_proj = nn.Conv1d(io_dim, dim, 1, bias=False)
        self.output_proj = nn.Conv1d(dim, io_dim, 1, bias=False)
        self.vq = _QuantizerList(n_q, size, dim)

    def forward(self, codes: Tensor) -> Tensor:  # [B, T, n_q] -> [B, io_dim, T]
        summed = torch.zeros((), device=codes.device)
        for i, layer in enumerate(self.vq.layers):
            summed = summed + layer(codes[..., i])  # [B, T, D]
        return self.output_proj(summed.transpose(1, 2))


class _SplitResidualVQ(nn.Module):
    """Codebook 0 (semantic) and codebooks 1.. (acoustic) have separate projections."""

    def __init__(self, config: CodecDecoderConfig) -> None:
        super().__init__()
        dim, size = config.codebook_dim // 2, config.codebook_size
        self.rvq_first = _ResidualVQ(1, size, dim, config.codebook_dim)
        self.rvq_rest = _ResidualVQ(config.num_quantizers - 1, size, dim, config.codebook_dim)

    def forward(self, codes: Tensor) -> Tensor:  # [B, T, Q] -> [B, codebook_dim, T]
        return self.rvq_first(codes[..., :1]) + self.rvq_rest(codes[..., 1:])


class _LayerScale(nn.Module):
    def __init__(self, dim: int, initial: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), initial))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x


class _Attention(nn.Module):
    def __init__(self, config: CodecDecoderConfig) -> None:
        super().__init__()
        self.head_dim = config.attention_head_dim
        self.groups = config.num_attention_heads // config.num_key_value_heads
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, hidden, bias=bias)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, past_k: Tensor, past_v: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, t, H]; cos/sin [B, 1, t, D]; past_k/v [B, Hkv, P, D]; mask [B, 1, t, P + t].
        Returns the output [B, t, H] and the keys/values [B, Hkv, P + t, D]."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # [B, Hq, t, D]
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, t, D]
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = torch.cat([past_k, apply_rope(k, cos, sin)], dim=2)
        v = torch.cat([past_v, v], dim=2)
        k_all, v_all = k, v
        if self.groups > 1:
            k, v = k.repeat_interleave(self.groups, dim=1), v.repeat_interleave(self.groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), k_all, v_all


class _TransformerLayer(nn.Module):
    def __init__(self, config: CodecDecoderConfig) -> None:
        super().__init__()
        self.self_attn = _Attention(config)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn_layer_scale = _LayerScale(config.hidden_size, config.layer_scale_initial_scale)
        self.mlp_layer_scale = _LayerScale(config.hidden_size, config.layer_scale_initial_scale)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, past_k: Tensor, past_v: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        h, k, v = self.self_attn(self.input_layernorm(x), cos, sin, past_k, past_v, mask)
        x = x + self.self_attn_layer_scale(h)
        x = x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))
        return x, k, v


class _Transformer(nn.Module):
    """Pre-norm transformer with RoPE and causal sliding-window attention over frames."""

    def __init__(self, config: CodecDecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(_TransformerLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rope = RotaryEmbedding(config.attention_head_dim, config.rope_theta)  # angles in fp32
        self.input_proj = nn.Linear(config.latent_dim, config.hidden_size)
        self.output_proj = nn.Linear(config.hidden_size, config.latent_dim)

    def forward(
        self, x: Tensor, start: Tensor, keys: list[Tensor], values: list[Tensor]
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """x [B, t, latent] at frames start[b] + 0..t-1; keys/values hold the previous
        P = sliding_window - 1 frames per layer. Returns [B, t, latent] and the new keys/values."""
        t, past = x.shape[1], self.config.sliding_window - 1
        steps = torch.arange(t, device=x.device)
        cos, sin = self.rope.cos_sin(start[:, None] + steps, x.dtype)  # [B, 1, t, D]
        # Key slot j holds frame start - past + j; query i (frame start + i) sees slots i..i + past
        # (itself and the `past` frames before it), except slots before the stream began.
        slots = torch.arange(past + t, device=x.device)[None, :]  # [1, P + t]
        in_window = (slots >= steps[:, None]) & (slots <= steps[:, None] + past)  # [t, P + t]
        begun = slots[None] >= past - start[:, None, None]  # [B, 1, P + t]
        mask = (in_window[None] & begun)[:, None]  # [B, 1, t, P + t]
        h = self.input_proj(x)
        new_keys, new_values = [], []
        for layer, past_k, past_v in zip(self.layers, keys, values):
            h, k, v = layer(h, cos, sin, past_k, past_v, mask)
            new_keys.append(k[:, :, k.shape[2] - past :].clone())
            new_values.append(v[:, :, v.shape[2] - past :].clone())
        return self.output_proj(self.norm(h)), new_keys, new_values


# ---------------------------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------------------------


@dataclass
class CodecDecoderState:
    """What a batch of decoder streams carries between `decode_step` calls (batch is dim 0).

    `decode_step` rebinds the fields to new tensors and never writes into them, so states from
    `split` (views) stay valid after the stacked state moves on.
    """

    position: Tensor  # [B] frames decoded so far
    keys: list[Tensor]  # per layer [B, Hkv, sliding_window - 1, D], RoPE applied
    values: list[Tensor]  # per layer [B, Hkv, sliding_window - 1, D]
    conv_history: list[Tensor]  # per causal conv in call order [B, C_in, context]

    @property
    def batch_size(self) -> int:
        return self.position.shape[0]

    @classmethod
    def stack(cls, states: Sequence[CodecDecoderState]) -> CodecDecoderState:
        """Joins streams into one batch, in the given order."""

        def cat(per_state: Sequence[list[Tensor]]) -> list[Tensor]:
            return [torch.cat(group) for group in zip(*per_state)]

        return cls(
            position=torch.cat([s.position for s in states]),
            keys=cat([s.keys for s in states]),
            values=cat([s.values for s in states]),
            conv_history=cat([s.conv_history for s in states]),
        )

    def split(self) -> list[CodecDecoderState]:
        """One state per batch element (views into this state's tensors)."""
        return [
            CodecDecoderState(
                position=self.position[i : i + 1],
                keys=[k[i : i + 1] for k in self.keys],
                values=[v[i : i + 1] for v in self.values],
                conv_history=[h[i : i + 1] for h in self.conv_history],
            )
            for i in range(self.batch_size)
        ]

    def reset(self) -> None:
        """Back to the start of a stream."""
        self.position = torch.zeros_like(self.position)
        self.keys = [torch.zeros_like(k) for k in self.keys]
        self.values = [torch.zeros_like(v) for v in self.values]
        self.conv_history = [torch.zeros_like(h) for h in self.conv_history]


class CodecDecoder(nn.Module):
    """Codes [B, T, Q] -> 24 kHz waveform [B, T * samples_per_frame], causal and streamable."""

    def __init__(self, config: CodecDecoderConfig) -> None:
        super().__init__()
        self.config = config
        rates = config.upsample_rates
        dims = [config.decoder_dim // 2**i for i in range(len(rates) + 1)]
        # Registered in call order: `new_state` lists the conv contexts in this order.
        self.quantizer = _SplitResidualVQ(config)
        self.pre_conv = _CausalConv(config.codebook_dim, config.latent_dim, 3)
        self.pre_transformer = _Transformer(config)
        self.upsample = nn.ModuleList(_UpsampleStage(config.latent_dim, r) for r in config.upsampling_ratios)
        self.decoder = nn.ModuleList(
            [
                _CausalConv(config.latent_dim, dims[0], 7),
                *(_DecoderBlock(dims[i], dims[i + 1], rate) for i, rate in enumerate(rates)),
                _SnakeBeta(dims[-1]),
                _CausalConv(dims[-1], 1, 7),
            ]
        )

    @property
    def samples_per_frame(self) -> int:
        return self.config.samples_per_frame

    def new_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> CodecDecoderState:
        """The state of `batch_size` streams that have not decoded anything yet (on the model's
        device and in its dtype unless told otherwise)."""
        cfg, weight = self.config, self.pre_conv.conv.weight
        device, dtype = device or weight.device, dtype or weight.dtype
        kv_shape = (batch_size, cfg.num_key_value_heads, cfg.sliding_window - 1, cfg.attention_head_dim)
        convs = [
            m for m in self.modules() if isinstance(m, (_CausalConv, _CausalConvTranspose)) and m.context > 0
        ]
        return CodecDecoderState(
            position=torch.zeros(batch_size, dtype=torch.long, device=device),
            keys=[torch.zeros(kv_shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)],
            values=[torch.zeros(kv_shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)],
            conv_history=[
                torch.zeros(batch_size, m.conv.in_channels, m.context, device=device, dtype=dtype)
                for m in convs
            ],
        )

    @torch.no_grad()
    def decode_step(self, codes: Tensor, state: CodecDecoderState) -> Tensor:
        """Decodes the next t >= 1 frames of each stream: codes [B, t, Q] -> [B, t * samples_per_frame].
        Advances `state` (its fields are rebound)."""
        if codes.dim() != 3 or codes.shape[1] == 0 or codes.shape[2] != self.config.num_quantizers:
            raise ValueError(
                f"codes must be [B, t >= 1, {self.config.num_quantizers}], got {tuple(codes.shape)}"
            )
        if codes.shape[0] != state.batch_size:
            raise ValueError(f"codes batch {codes.shape[0]} != state batch {state.batch_size}")
        carry = _ConvCarry(state.conv_history)
        x = self.pre_conv(self.quantizer(codes), carry)  # [B, latent, t]
        h, keys, values = self.pre_transformer(x.transpose(1, 2), state.position, state.keys, state.values)
        x = h.transpose(1, 2)  # [B, latent, t]
        for stage in self.upsample:
            x = stage(x, carry)
        x = self.decoder[0](x, carry)  # [B, decoder_dim, t * prod(upsampling_ratios)]
        for block in self.decoder[1:-2]:
            x = block(x, carry)
        wav = self.decoder[-1](self.decoder[-2](x), carry)  # [B, 1, t * samples_per_frame]
        state.keys, state.values, state.conv_history = keys, values, carry.finish()
        state.position = state.position + codes.shape[1]
        return wav[:, 0].clamp(-1.0, 1.0)

    def decode(self, codes: Tensor) -> Tensor:
        """Whole sequences in one pass: codes [B, T, Q] -> [B, T * samples_per_frame]."""
        return self.decode_step(codes, self.new_state(codes.shape[0]))

    def chunked_decode_reference(
        self, codes: Tensor, chunk_size: int = 300, left_context: int = 25
    ) -> Tensor:
        """The official `chunked_decode`: each chunk is decoded from scratch after re-decoding up to
        `left_context` earlier frames, whose audio is dropped. Approximate at chunk seams."""
        pieces = []
        for start in range(0, codes.shape[1], chunk_size):
            context = min(left_context, start)
            wav = self.decode(codes[:, start - context : start + chunk_size])
            pieces.append(wav[:, context * self.samples_per_frame :])
        return torch.cat(pieces, dim=-1)


# ---------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------


def _rvq_encode(rvq: MimiResidualVectorQuantizer, x: Tensor, n_q: int) -> Tensor:
    """Greedy residual quantization with the first n_q codebooks: x [B, C, T] -> codes [B, T, n_q].
    Reads the codebooks on every call (Mimi's own `encode` caches them on the module)."""
    if rvq.input_proj is not None:
        x = rvq.input_proj(x)
    residual = x.transpose(1, 2)  # [B, T, D]
    codes = []
    for layer in list(rvq.layers)[:n_q]:
        book = cast(MimiEuclideanCodebook, layer.codebook)
        entries = book.embed_sum / book.cluster_usage.clamp(min=book.epsilon)[:, None]  # [K, D]
        flat = residual.reshape(1, -1, residual.shape[-1]).float()
        index = torch.cdist(flat, entries[None].float())[0].argmin(dim=-1).view(residual.shape[:-1])  # [B, T]
        residual = residual - F.embedding(index, entries)
        codes.append(index)
    return torch.stack(codes, dim=-1)


class CodecEncoder(nn.Module):
    """Mimi's encoder half (SEANet, transformer, downsampling, split RVQ) from transformers' blocks,
    under the official names; only the first `num_quantizers` codebooks are used."""

    def __init__(self, mimi: dict[str, Any], num_quantizers: int) -> None:
        super().__init__()
        config = MimiConfig(**mimi)
        config._attn_implementation = "sdpa"
        stride = int(config.encodec_frame_rate / config.frame_rate)
        self.num_quantizers = num_quantizers
        self.samples_per_frame = round(config.sampling_rate / config.frame_rate)
        self.encoder = MimiEncoder(config)
        self.encoder_transformer = MimiTransformerModel(config)
        hidden = config.hidden_size
        self.downsample = MimiConv1d(
            config, hidden, hidden, kernel_size=2 * stride, stride=stride, bias=False, pad_mode="replicate"
        )
        self.quantizer = MimiSplitResidualVectorQuantizer(config)

    @torch.no_grad()
    def encode(self, wav: Tensor) -> Tensor:
        """wav [B, S] at 24 kHz -> codes [B, ceil(S / samples_per_frame), num_quantizers]."""
        if wav.dim() != 2 or wav.shape[1] == 0:
            raise ValueError(f"wav must be [B, S >= 1], got {tuple(wav.shape)}")
        x = self.encoder(wav[:, None])  # [B, hidden, S / 960]
        x = self.encoder_transformer(x.transpose(1, 2)).last_hidden_state.transpose(1, 2)
        x = self.downsample(x)  # [B, hidden, T]
        n_semantic = self.quantizer.num_semantic_quantizers
        codes = torch.cat(
            [
                _rvq_encode(self.quantizer.semantic_residual_vector_quantizer, x, n_semantic),
                _rvq_encode(
                    self.quantizer.acoustic_residual_vector_quantizer, x, self.num_quantizers - n_semantic
                ),
            ],
            dim=-1,
        )
        return codes[:, : math.ceil(wav.shape[1] / self.samples_per_frame)]


# ---------------------------------------------------------------------------------------------
# The whole tokenizer and its checkpoints
# ---------------------------------------------------------------------------------------------


def _tokenizer_dir(path: str | Path) -> Path:
    """A model root holds the codec in `speech_tokenizer/`; a codec folder is taken as is."""
    path = Path(path)
    return path / "speech_tokenizer" if (path / "speech_tokenizer").is_dir() else path


class SpeechTokenizer(nn.Module):
    """Official `Qwen3TTSTokenizerV2Model` layout: `encoder.*` (optional) and `decoder.*`."""

    def __init__(self, config: CodecConfig, with_encoder: bool = True) -> None:
        super().__init__()
        self.config = config
        self.encoder = (
            CodecEncoder(config.encoder, config.encoder_valid_num_quantizers) if with_encoder else None
        )
        self.decoder = CodecDecoder(config.decoder)

    @property
    def device(self) -> torch.device:
        return self.decoder.pre_conv.conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.pre_conv.conv.weight.dtype

    @property
    def sample_rate(self) -> int:
        return self.config.output_sample_rate

    def encode(self, wav: Tensor) -> Tensor:
        """wav [B, S] at 24 kHz -> codes [B, T, Q]; see `CodecEncoder.encode`."""
        if self.encoder is None:
            raise UnsupportedOperationError(
                "the codec was loaded without its encoder, which voice cloning needs"
            )
        return self.encoder.encode(wav)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        with_encoder: bool = True,
    ) -> SpeechTokenizer:
        """Loads `config.json` + `model.safetensors` from a codec folder or a model root."""
        folder = _tokenizer_dir(path)
        try:
            model = cls(CodecConfig.from_dir(folder), with_encoder=with_encoder)
            weights = load_file(folder / "model.safetensors")
            if not with_encoder:
                weights = {k: v for k, v in weights.items() if not k.startswith("encoder.")}
            model.load_state_dict(weights, strict=True)
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            raise CheckpointError(f"speech tokenizer in {folder}: {e}") from e
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, path: str | Path) -> None:
        """Writes config.json, preprocessor_config.json and model.safetensors in the official layout."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        (folder / "preprocessor_config.json").write_text(
            json.dumps(self.config.preprocessor_dict(), indent=2) + "\n"
        )
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
