"""Logit processing and sampling, with the official semantics, for a whole batch at once.

Talker (codebook 0): repetition penalty over the codebook-0 tokens generated so far in
the utterance, EOS forbidden before ``min_new_tokens``, the codec specials suppressed
(except EOS); then temperature, top-k, top-p and a random draw, or argmax when
``do_sample`` is false. Code predictor (codebooks 1..15): temperature/top-k/top-p only.

Everything is a tensor op over ``[B, V]`` with per-row settings, so a batch is sampled
on the device without a host round trip per codebook (and can be captured in a CUDA
graph). The random draw is Gumbel-max with counter-based noise: the uniform for
vocabulary entry ``v`` of codebook ``c`` at step ``n`` of the utterance seeded ``s`` is an
integer hash of ``(s, n, c, v)``, computed with int64 tensor ops. A seeded utterance
therefore draws the same numbers whatever batch it is in, in whatever row, on any
device; an unseeded one gets a random seed when it starts.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from qwen3tts_rt.errors import InvalidSamplingError


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = True
    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.05
    subtalker_do_sample: bool = True
    subtalker_temperature: float = 0.9
    subtalker_top_k: int = 50
    subtalker_top_p: float = 1.0
    min_new_tokens: int = 2
    max_new_tokens: int = 2048

    @classmethod
    def greedy(cls, **kw: Any) -> SamplingParams:
        """What the official ``do_sample=False, subtalker_dosample=False`` means: the
        repetition penalty, suppression and minimum length still apply."""
        return cls(do_sample=False, subtalker_do_sample=False, **kw)

    @classmethod
    def from_generation_config(cls, gen: dict[str, Any], **overrides: Any) -> SamplingParams:
        """Defaults from a checkpoint's generation_config.json, then ``overrides``
        (``None`` values in overrides are ignored)."""
        keys = {
            "do_sample": "do_sample",
            "temperature": "temperature",
            "top_k": "top_k",
            "top_p": "top_p",
            "repetition_penalty": "repetition_penalty",
            "subtalker_dosample": "subtalker_do_sample",
            "subtalker_temperature": "subtalker_temperature",
            "subtalker_top_k": "subtalker_top_k",
            "subtalker_top_p": "subtalker_top_p",
            "max_new_tokens": "max_new_tokens",
        }
        base = {ours: gen[theirs] for theirs, ours in keys.items() if theirs in gen}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base).validated()

    def validated(self) -> SamplingParams:
        def bad(name: str, rule: str) -> InvalidSamplingError:
            return InvalidSamplingError(f"{getattr(self, name)!r} breaks the rule: {rule}", field=name)

        for name in ("temperature", "subtalker_temperature"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0.0 < v <= 10.0):
                raise bad(name, "0 < temperature <= 10 (use greedy decoding for deterministic output)")
        for name in ("top_k", "subtalker_top_k"):
            v = getattr(self, name)
            if not (isinstance(v, int) and 0 <= v <= 4096):
                raise bad(name, "an integer 0 <= top_k <= 4096 (0 disables top-k)")
        for name in ("top_p", "subtalker_top_p"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0.0 < v <= 1.0):
                raise bad(name, "0 < top_p <= 1")
        if not (math.isfinite(self.repetition_penalty) and 0.5 <= self.repetition_penalty <= 2.0):
            raise bad("repetition_penalty", "0.5 <= repetition_penalty <= 2")
        if not (0 <= self.min_new_tokens <= 64):
            raise bad("min_new_tokens", "0 <= min_new_tokens <= 64")
        if not (1 <= self.max_new_tokens <= 65536):
            raise bad("max_new_tokens", "1 <= max_new_tokens <= 65536")
        return self

    def with_(self, **kw: Any) -> SamplingParams:
        return replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------ counter-based noise

_M32 = 0xFFFF_FFFF
# Both multipliers are below 2**31, so a 32-bit value times one stays below 2**63: the hash
# never overflows int64 and gives the same bits on every device.
_MUL1, _MUL2 = 0x21F0AAAD, 0x735A2D97
_SALT_SEED, _SALT_VOCAB = 0x9E3779B9, 0x85EBCA6B


def random_seed() -> int:
    """A fresh seed for an utterance that was not given one."""
    return secrets.randbits(63)


def split_seed(seed: int) -> tuple[int, int]:
    """Any Python int -> its low 64 bits as two 32-bit halves (lo, hi)."""
    s = seed & 0xFFFF_FFFF_FFFF_FFFF
    return s & _M32, s >> 32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32, second constants) of int64 tensors holding
    values in [0, 2**32). A bijection with low bias, in plain int64 tensor ops."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _M32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _M32
    return x ^ (x >> 15)


def counter_bits(
    seed: torch.Tensor,  # [B, 2] int64: 32-bit halves (lo, hi) of each row's seed
    step: torch.Tensor,  # [B] int64: the row's step counter within its utterance
    first_codebook: int,
    codebooks: int,
    vocab: int,
) -> torch.Tensor:
    """[B, K, V] int64 in [0, 2**32): the hash of (seed, step, codebook, vocab index) for
    codebooks first_codebook .. first_codebook + K - 1. Row b depends on row b's inputs only."""
    dev = seed.device
    key = hash32(seed[:, 0] ^ _SALT_SEED)
    key = hash32(key ^ seed[:, 1])
    key = hash32(key ^ (step & _M32))  # [B]
    cb = torch.arange(first_codebook, first_codebook + codebooks, device=dev, dtype=torch.int64)
    key = hash32(key[:, None] ^ cb[None, :])  # [B, K]
    vocab_key = hash32(torch.arange(vocab, device=dev, dtype=torch.int64) ^ _SALT_VOCAB)  # [V]
    return hash32(key[:, :, None] ^ vocab_key)  # [B, K, V]


def gumbel_noise(
    seed: torch.Tensor, step: torch.Tensor, first_codebook: int, codebooks: int, vocab: int
) -> torch.Tensor:
    """[B, K, V] float32 standard Gumbel noise from ``counter_bits`` (uniforms in (0, 1)
    exact in float64, the double log taken in float64, then rounded)."""
    bits = counter_bits(seed, step, first_codebook, codebooks, vocab)
    u = (bits.double() + 0.5) * 2.0**-32
    return (-torch.log(-torch.log(u))).float()


# ------------------------------------------------------------------------ per-row processing


@dataclass(frozen=True)
class DrawSettings:
    """Per-row settings of one draw ([B] tensors on the device)."""

    do_sample: torch.Tensor  # bool
    temperature: torch.Tensor  # float32
    top_k: torch.Tensor  # int64; 0 (or >= V) keeps every token
    top_p_rest: torch.Tensor  # float32: 1 - top_p, computed in float64, then rounded (as the reference)
    use_top_p: torch.Tensor  # bool: top_p < 1


def draw_values(params: SamplingParams, subtalker: bool) -> tuple[bool, float, int, bool, float]:
    """(do_sample, temperature, top_k, use_top_p, 1 - top_p) of the talker or the code predictor."""
    if subtalker:
        p = (params.subtalker_do_sample, params.subtalker_temperature, params.subtalker_top_k)
        top_p = params.subtalker_top_p
    else:
        p = (params.do_sample, params.temperature, params.top_k)
        top_p = params.top_p
    return (*p, top_p < 1.0, 1.0 - top_p)


def filter_top_k_top_p(
    scores: torch.Tensor,  # [B, V] float32, already divided by the temperature
    top_k: torch.Tensor,  # [B] int64
    top_p_rest: torch.Tensor,  # [B] float32
    use_top_p: torch.Tensor,  # [B] bool
) -> torch.Tensor:
    """HF's TopK then TopP warpers, per row: drop what is below the k-th largest score; then,
    in ascending order, drop tokens while the cumulative probability is <= 1 - top_p
    (the most likely token always stays)."""
    v = scores.shape[-1]
    k = torch.where((top_k > 0) & (top_k < v), top_k, v)
    kth = scores.sort(dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])  # [B, 1]
    scores = scores.masked_fill(scores < kth, -math.inf)
    ascending, order = scores.sort(dim=-1)
    cum = ascending.softmax(-1).cumsum(-1)
    drop = (cum <= top_p_rest[:, None]) & use_top_p[:, None]
    drop[:, -1] = False
    drop = drop.scatter(-1, order, drop)
    return scores.masked_fill(drop, -math.inf)


def draw_rows(
    scores: torch.Tensor,  # [B, V] float32, processed
    settings: DrawSettings,
    noise: torch.Tensor | None,  # [B, V] float32 Gumbel noise; None when no row samples
) -> torch.Tensor:
    """[B] int64: argmax for greedy rows; for sampling rows a draw from
    softmax(top-k/top-p(scores / temperature)) by Gumbel-max."""
    greedy = scores.argmax(-1)
    if noise is None:
        return greedy
    x = filter_top_k_top_p(
        scores / settings.temperature[:, None], settings.top_k, settings.top_p_rest, settings.use_top_p
    )
    sampled = (x + noise).argmax(-1)
    return torch.where(settings.do_sample, sampled, greedy)


def process_talker_logits(
    logits: torch.Tensor,  # [B, V] float32
    generated: torch.Tensor,  # [B, V] bool: codebook-0 tokens generated so far in each utterance
    penalty: torch.Tensor,  # [B] float32 repetition penalty
    eos_allowed: torch.Tensor,  # [B] bool: min_new_tokens reached
    eos: torch.Tensor,  # [V] bool: one-hot of the codec EOS id
    suppress: torch.Tensor,  # [V] bool
) -> torch.Tensor:
    """Repetition penalty, EOS before min_new_tokens and the codec specials, per row."""
    pen = penalty[:, None]
    penalised = torch.where(logits < 0, logits * pen, logits / pen)
    logits = torch.where(generated, penalised, logits)
    forbid = suppress | (eos & ~eos_allowed[:, None])
    return logits.masked_fill(forbid, -math.inf)
