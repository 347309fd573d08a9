"""Logit processing and sampling, with the official semantics.

Talker (codebook 0): repetition penalty over the codebook-0 tokens generated so far in
the utterance, EOS forbidden before ``min_new_tokens``, the codec specials suppressed
(except EOS); then temperature, top-k, top-p and a multinomial draw, or argmax when
``do_sample`` is false. Code predictor (codebooks 1..15): temperature/top-k/top-p only.

Each row carries its own ``torch.Generator`` so that a session's draws do not depend
on which other sessions share the batch: a seeded stream reproduces exactly.
"""

from __future__ import annotations

import math
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


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    # logits [V] float32, already divided by the temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[-1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(0, order, remove_sorted)
        logits = logits.masked_fill(remove, -math.inf)
    return logits


def draw(
    logits: torch.Tensor,  # [V] float32, processed
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> int:
    if not do_sample:
        return int(torch.argmax(logits).item())
    filtered = _filter_top_k_top_p(logits / temperature, top_k, top_p)
    probs = filtered.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def process_talker_logits(
    logits: torch.Tensor,  # [V] float32
    generated: torch.Tensor,  # [V] bool: codebook-0 tokens generated so far in this utterance
    num_generated: int,
    params: SamplingParams,
    eos_id: int,
    suppress_mask: torch.Tensor,  # [V] bool
) -> torch.Tensor:
    if params.repetition_penalty != 1.0 and bool(generated.any()):
        pen = params.repetition_penalty
        penalised = torch.where(logits < 0, logits * pen, logits / pen)
        logits = torch.where(generated, penalised, logits)
    if num_generated < params.min_new_tokens:
        logits = logits.clone()
        logits[eos_id] = -math.inf
    return logits.masked_fill(suppress_mask, -math.inf)
