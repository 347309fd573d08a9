"""Qwen3-style decoder stack with an explicit, slot-addressed KV cache.

The modules hold weights only. Everything that changes while a stream runs lives in
``KVCache`` (one per pool of session slots), passed in by the caller.
Parameter names follow the official checkpoints (``layers.N.self_attn.q_proj`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwen3tts_rt.model.config import DecoderStackConfig

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def activation(name: str):  # type: ignore[no-untyped-def]
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation '{name}'") from None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class RotaryEmbedding:
    """Plain 1-D RoPE. The talker's multimodal RoPE reduces to this because for TTS
    the three position rows are always equal."""

    def __init__(self, head_dim: int, theta: float) -> None:
        exps = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        self.inv_freq = 1.0 / (theta**exps)  # [D/2] float32

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [B, T] -> cos, sin [B, 1, T, D]
        inv = self.inv_freq.to(positions.device)
        freqs = positions.float()[..., None] * inv  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


@dataclass
class KVCache:
    """Keys and values of every layer for a pool of session slots.

    ``k``/``v``: [L, slots, capacity, H_kv, D]. Which positions are valid is tracked by
    the caller (per-slot lengths), so a slot is freed by simply forgetting its length.
    Capacity grows on demand (CPU path); the GPU path preallocates the maximum.
    """

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def allocate(
        cls, cfg: DecoderStackConfig, slots: int, capacity: int, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        shape = (cfg.num_hidden_layers, slots, capacity, cfg.num_key_value_heads, cfg.head_dim)
        return cls(
            torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        )

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    def ensure_capacity(self, needed: int, step: int = 256) -> None:
        if needed <= self.capacity:
            return
        new_cap = ((needed + step - 1) // step) * step
        grow = list(self.k.shape)
        grow[2] = new_cap - self.capacity
        self.k = torch.cat([self.k, self.k.new_zeros(grow)], dim=2)
        self.v = torch.cat([self.v, self.v.new_zeros(grow)], dim=2)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderStackConfig) -> None:
        super().__init__()
        d, h, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim, self.num_heads, self.num_kv_heads = d, h, hkv
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, H]
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin [B, 1, T, D]
        cache: KVCache,
        layer: int,
        slots: torch.Tensor,  # [B] long
        write_pos: torch.Tensor,  # [B, T] long: cache positions of the new tokens
        mask: torch.Tensor,  # [B, 1, T, S] bool, True = attend
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        cos, sin = rope
        q = apply_rope(q, cos, sin)  # [B, Hq, T, D]
        k = apply_rope(k, cos, sin).transpose(1, 2)  # [B, T, Hkv, D]
        cache.k[layer, slots[:, None], write_pos] = k
        cache.v[layer, slots[:, None], write_pos] = v
        s = mask.shape[-1]
        keys = cache.k[layer, slots, :s].transpose(1, 2)  # [B, Hkv, S, D]
        values = cache.v[layer, slots, :s].transpose(1, 2)
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            keys = keys.repeat_interleave(rep, dim=1)
            values = values.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [B, Hq, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderStackConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, *args: object) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), *args)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """``layers`` + final ``norm``; embeddings and heads belong to the owner."""

    def __init__(self, cfg: DecoderStackConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, H]
        cache: KVCache,
        slots: torch.Tensor,  # [B] long: which cache slot each row uses
        lengths: torch.Tensor,  # [B] long: positions already in the cache for each row
    ) -> torch.Tensor:
        """Run T new positions per row after ``lengths[b]`` cached ones; returns the
        normed hidden states [B, T, H]. The caller advances its lengths by T."""
        _b, t, _ = x.shape
        new_pos = lengths[:, None] + torch.arange(t, device=x.device)  # [B, T]
        span = int(lengths.max().item()) + t
        cache.ensure_capacity(span)
        keys = torch.arange(span, device=x.device)
        mask = (keys[None, None, :] <= new_pos[:, :, None])[:, None]  # [B, 1, T, S]
        rope = self.rope.cos_sin(new_pos, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, cache, i, slots, new_pos, mask)
        return self.norm(x)
