"""The decoder stack with its slot-addressed KV cache: chunked == whole, batched == alone."""

from __future__ import annotations

import torch

from qwen3tts_rt.model.config import DecoderStackConfig
from qwen3tts_rt.model.layers import DecoderStack, KVCache

CFG = DecoderStackConfig(
    vocab_size=16,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    attention_bias=False,
    hidden_act="silu",
)


def _stack() -> DecoderStack:
    torch.manual_seed(0)
    m = DecoderStack(CFG).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _run(m: DecoderStack, x: torch.Tensor, chunks: list[int], slots: int = 1, slot: int = 0) -> torch.Tensor:
    cache = KVCache.allocate(CFG, slots, 8, torch.device("cpu"), torch.float32)
    out, pos = [], 0
    for n in chunks:
        out.append(m(x[:, pos : pos + n], cache, torch.tensor([slot]), torch.tensor([pos])))
        pos += n
    return torch.cat(out, dim=1)


@torch.no_grad()
def test_chunked_equals_whole_and_cache_grows() -> None:
    m = _stack()
    x = torch.randn(1, 40, CFG.hidden_size)
    whole = _run(m, x, [40])
    for chunks in ([1] * 40, [7, 1, 1, 13, 18], [39, 1]):
        torch.testing.assert_close(_run(m, x, chunks), whole, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_causal_prefix_does_not_see_the_future() -> None:
    m = _stack()
    x = torch.randn(1, 12, CFG.hidden_size)
    y = x.clone()
    y[:, 8:] = torch.randn(1, 4, CFG.hidden_size)
    torch.testing.assert_close(_run(m, x, [12])[:, :8], _run(m, y, [12])[:, :8])


@torch.no_grad()
def test_batched_rows_with_different_lengths_equal_each_alone() -> None:
    m = _stack()
    lens = [5, 11, 2]
    seqs = [torch.randn(1, n + 3, CFG.hidden_size) for n in lens]
    alone = [_run(m, s, [n, 1, 1, 1]) for s, n in zip(seqs, lens)]
    cache = KVCache.allocate(CFG, 4, 8, torch.device("cpu"), torch.float32)
    slots = [3, 0, 1]  # arbitrary slot assignment
    for s, n, slot in zip(seqs, lens, slots):
        m(s[:, :n], cache, torch.tensor([slot]), torch.tensor([0]))
    steps = []
    for k in range(3):
        x = torch.cat([s[:, n + k : n + k + 1] for s, n in zip(seqs, lens)])
        steps.append(m(x, cache, torch.tensor(slots), torch.tensor([n + k for n in lens])))
    batched = torch.cat(steps, dim=1)  # [3, 3, H]
    for i in range(3):
        torch.testing.assert_close(batched[i], alone[i][0, lens[i] :], atol=1e-5, rtol=1e-5)
