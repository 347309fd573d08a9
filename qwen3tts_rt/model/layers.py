"""Qwen3-style decoder stack with an explicit, slot-addressed KV cache.

The modules hold weights only. Everything that changes while a stream runs lives in
``KVCache`` (one per pool of session slots), passed in by the caller.
Parameter names follow the official checkpoints (``layers.N.self_attn.q_proj`` ...).

Two kinds of cache, one attention function (``cached_attention``):

* dynamic (the CPU default): capacity grows on demand; each call attends over the
  positions the longest row has, with a per-row causal mask (exact, cheapest on CPU);
* static (the GPU fast path): preallocated to a fixed capacity that never changes, so a
  step has the same shapes whatever the rows' lengths (CUDA-graph capturable). Attention
  spans the whole capacity with a per-row length mask (torch SDPA), or, on CUDA in
  fp16/bf16 with flash-attn installed, ``flash_attn_with_kvcache`` reads each row's own
  length only.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    """Computed in float32, scaled by the weight in the input's dtype (talker and codec)."""

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
    """Plain 1-D RoPE, angles in float32. The talker's multimodal RoPE reduces to this
    because for TTS the three position rows are always equal; the codec decoder's
    transformer uses it as is."""

    def __init__(self, head_dim: int, theta: float) -> None:
        exps = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        self.inv_freq = 1.0 / (theta**exps)  # [D/2] float32
        # One copy per device, made once: a host-to-device copy cannot run inside a CUDA graph.
        self._on: dict[torch.device, torch.Tensor] = {torch.device("cpu"): self.inv_freq}

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [B, T] -> cos, sin [B, 1, T, D]
        inv = self._on.get(positions.device)
        if inv is None:
            inv = self._on[positions.device] = self.inv_freq.to(positions.device)
        freqs = positions.float()[..., None] * inv  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


_flash_kvcache: Callable[..., torch.Tensor] | None = None


def flash_attn_kvcache() -> Callable[..., torch.Tensor] | None:
    """``flash_attn.flash_attn_with_kvcache`` when the package is installed (the ``gpu``
    extra), else None. Imported on first use only."""
    global _flash_kvcache
    if _flash_kvcache is None and importlib.util.find_spec("flash_attn") is not None:
        _flash_kvcache = importlib.import_module("flash_attn").flash_attn_with_kvcache
    return _flash_kvcache


def attention_backend(device: torch.device, dtype: torch.dtype, prefer: str = "auto") -> str:
    """'flash' for static caches on CUDA in fp16/bf16 with flash-attn installed, else 'sdpa'.
    ``prefer``: 'auto', 'sdpa' (always honoured) or 'flash' (an error where it cannot run)."""
    if prefer not in ("auto", "sdpa", "flash"):
        raise ValueError(f"attention must be 'auto', 'sdpa' or 'flash', got {prefer!r}")
    if prefer == "sdpa":
        return "sdpa"
    ok = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if ok and flash_attn_kvcache() is not None:
        return "flash"
    if prefer == "flash":
        raise ValueError("flash attention needs CUDA, fp16/bf16 and the flash-attn package (the gpu extra)")
    return "sdpa"


@dataclass
class KVCache:
    """Keys and values of every layer for a pool of session slots.

    ``k``/``v``: [L, slots, capacity, H_kv, D]. Which positions are valid is tracked by
    the caller (per-slot lengths), so a slot is freed by simply forgetting its length.
    A dynamic cache grows on demand; a ``static`` one keeps its capacity and its tensors
    for life (a captured CUDA graph holds their addresses) and its attention spans the
    whole capacity. ``backend``: 'sdpa', or 'flash' (static caches only).
    """

    k: torch.Tensor
    v: torch.Tensor
    static: bool = False
    backend: str = "sdpa"

    @classmethod
    def allocate(
        cls,
        cfg: DecoderStackConfig,
        slots: int,
        capacity: int,
        device: torch.device,
        dtype: torch.dtype,
        *,
        static: bool = False,
        backend: str = "sdpa",
    ) -> KVCache:
        if backend == "flash" and not static:
            raise ValueError("flash attention needs a static cache")
        shape = (cfg.num_hidden_layers, slots, capacity, cfg.num_key_value_heads, cfg.head_dim)
        return cls(
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
            static=static,
            backend=backend,
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
        if self.static:
            raise ValueError(f"a static KV cache holds {self.capacity} positions; {needed} needed")
        new_cap = ((needed + step - 1) // step) * step
        grow = list(self.k.shape)
        grow[2] = new_cap - self.capacity
        self.k = torch.cat([self.k, self.k.new_zeros(grow)], dim=2)
        self.v = torch.cat([self.v, self.v.new_zeros(grow)], dim=2)


def cached_attention(
    q: torch.Tensor,  # [B, Hq, T, D], RoPE applied
    k: torch.Tensor,  # [B, T, Hkv, D], RoPE applied
    v: torch.Tensor,  # [B, T, Hkv, D]
    cache: KVCache,
    layer: int,
    slots: torch.Tensor,  # [B] long
    write_pos: torch.Tensor,  # [B, T] long: cache positions of the new tokens (consecutive)
    mask: torch.Tensor | None,  # [B, 1, T, S] bool, True = attend (None for flash)
) -> torch.Tensor:
    """Writes the new keys/values at ``write_pos`` of each row's slot and attends causally
    over the row's cached positions: -> [B, T, Hq, D]."""
    if cache.backend == "flash":
        fn = flash_attn_kvcache()
        assert fn is not None
        # Appends k/v at cache_seqlens[b] of slot cache_batch_idx[b], then attends over
        # cache_seqlens[b] + T positions, causally aligned to the end.
        out: Any = fn(
            q.transpose(1, 2).contiguous(),
            cache.k[layer],
            cache.v[layer],
            k=k.contiguous(),
            v=v.contiguous(),
            cache_seqlens=write_pos[:, 0].to(torch.int32),
            cache_batch_idx=slots.to(torch.int32),
            causal=True,
        )
        return out
    assert mask is not None
    cache.k[layer, slots[:, None], write_pos] = k
    cache.v[layer, slots[:, None], write_pos] = v
    s = mask.shape[-1]
    keys = cache.k[layer, slots, :s].transpose(1, 2)  # [B, Hkv, S, D]
    values = cache.v[layer, slots, :s].transpose(1, 2)
    rep = q.shape[1] // keys.shape[1]
    if rep > 1:
        keys = keys.repeat_interleave(rep, dim=1)
        values = values.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask).transpose(1, 2)


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
        mask: torch.Tensor | None,  # [B, 1, T, S] bool, True = attend (None for flash)
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        cos, sin = rope
        q = apply_rope(q, cos, sin)  # [B, Hq, T, D]
        k = apply_rope(k, cos, sin).transpose(1, 2)  # [B, T, Hkv, D]
        out = cached_attention(q, k, v, cache, layer, slots, write_pos, mask)  # [B, T, Hq, D]
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))


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
        normed hidden states [B, T, H]. The caller advances its lengths by T.

        On a static cache nothing here reads a tensor's value on the host (no sync, fixed
        shapes): the caller guarantees ``lengths + T <= capacity``."""
        _b, t, _ = x.shape
        new_pos = lengths[:, None] + torch.arange(t, device=x.device)  # [B, T]
        mask: torch.Tensor | None = None
        if not cache.static:
            span = int(lengths.max().item()) + t
            cache.ensure_capacity(span)
            keys = torch.arange(span, device=x.device)
            mask = (keys[None, None, :] <= new_pos[:, :, None])[:, None]  # [B, 1, T, S]
        elif cache.backend != "flash":
            keys = torch.arange(cache.capacity, device=x.device)
            mask = (keys[None, None, :] <= new_pos[:, :, None])[:, None]  # [B, 1, T, capacity]
        rope = self.rope.cos_sin(new_pos, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, cache, i, slots, new_pos, mask)
        return self.norm(x)
