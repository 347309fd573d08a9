"""The fast path on CPU: static KV cache and batch buckets against the dynamic path, the
captured-step plumbing (emulated: no CUDA here), the batched decoder pool, and the
on-device sampler (distribution, batch invariance, seeds, reference top-k/top-p).

What needs a GPU (real CUDA graphs, flash-attn, bf16) is in the ``gpu`` tests at the end
and in benchmarks/gpu_check.py; see benchmarks/gpu_recipe.md.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

from qwen3tts_rt.engine.engine import Engine, EngineConfig, Session
from qwen3tts_rt.engine.generation import FinishReason, FrameGenerator, UtteranceState
from qwen3tts_rt.engine.messages import PcmPacket, SessionError, UtteranceDone
from qwen3tts_rt.engine.synth import new_utterance, synthesize
from qwen3tts_rt.engine.voices import voice_prompt
from qwen3tts_rt.model.checkpoint import Checkpoint
from qwen3tts_rt.model.cuda_graphs import FastPath, default_buckets
from qwen3tts_rt.model.decoder_pool import DecoderPool
from qwen3tts_rt.model.layers import KVCache, attention_backend
from qwen3tts_rt.model.prompt import VoicePrompt
from qwen3tts_rt.model.sampling import (
    DrawSettings,
    SamplingParams,
    counter_bits,
    draw_rows,
    filter_top_k_top_p,
    gumbel_noise,
    process_talker_logits,
    split_seed,
)

EN = "Hello! Streaming text in, one token at a time, 42 times."
GREEDY = SamplingParams.greedy(max_new_tokens=16)
SAMPLED = SamplingParams(max_new_tokens=16)
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# =============================================================================== references


def ref_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The former per-row implementation (HF TopK then TopP warpers) on one row [V]."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[-1] = False
        remove = remove_sorted.scatter(0, order, remove_sorted)
        logits = logits.masked_fill(remove, -math.inf)
    return logits


def ref_process(
    logits: torch.Tensor,
    generated: torch.Tensor,
    n: int,
    pen: float,
    min_new: int,
    eos: int,
    sup: torch.Tensor,
) -> torch.Tensor:
    """The former per-row talker logit processing on one row [V]."""
    if pen != 1.0 and bool(generated.any()):
        penalised = torch.where(logits < 0, logits * pen, logits / pen)
        logits = torch.where(generated, penalised, logits)
    if n < min_new:
        logits = logits.clone()
        logits[eos] = -math.inf
    return logits.masked_fill(sup, -math.inf)


M32 = 0xFFFFFFFF


def py_hash32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & M32
    x ^= x >> 15
    x = (x * 0x735A2D97) & M32
    return x ^ (x >> 15)


def py_bits(seed: int, step: int, codebook: int, v: int) -> int:
    lo, hi = split_seed(seed)
    key = py_hash32(lo ^ 0x9E3779B9)
    key = py_hash32(key ^ hi)
    key = py_hash32(key ^ (step & M32))
    key = py_hash32(key ^ codebook)
    return py_hash32(key ^ py_hash32(v ^ 0x85EBCA6B))


def settings(
    n: int, do_sample: bool = True, temp: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> DrawSettings:
    return DrawSettings(
        torch.full((n,), do_sample),
        torch.full((n,), temp, dtype=torch.float32),
        torch.full((n,), top_k, dtype=torch.long),
        torch.full((n,), 1.0 - top_p, dtype=torch.float32),
        torch.full((n,), top_p < 1.0),
    )


def seeds(values: list[int]) -> torch.Tensor:
    return torch.tensor([list(split_seed(s)) for s in values], dtype=torch.long)


# =============================================================================== the sampler


def test_counter_hash_equals_python_integer_math() -> None:
    """The int64 tensor hash is exact 32-bit integer math (no overflow, logical shifts):
    the same bits as plain Python ints, hence the same on any device."""
    cases = [(0, 0), (7, 3), (2**63 - 1, 2**32 - 1), (-5, 12345), (123456789123, 99)]
    s = seeds([c[0] for c in cases])
    step = torch.tensor([c[1] for c in cases])
    bits = counter_bits(s, step, 0, 3, 50)  # [5, 3, 50]
    for b, (seed, st) in enumerate(cases):
        for cb in range(3):
            for v in (0, 1, 17, 49):
                assert int(bits[b, cb, v]) == py_bits(seed, st, cb, v)
    assert int(bits.min()) >= 0 and int(bits.max()) <= M32


def test_uniforms_are_uniform() -> None:
    bits = counter_bits(seeds(list(range(64))), torch.arange(64), 0, 4, 1024)
    u = (bits.double() + 0.5) / 2**32
    hist = torch.histc(u.float(), bins=32, min=0, max=1)
    expected = u.numel() / 32
    chi2 = float(((hist - expected) ** 2 / expected).sum())
    assert chi2 < 70, chi2  # chi-square, 31 dof: p ~ 1e-4 at 62
    assert abs(float(u.mean()) - 0.5) < 0.005


@pytest.mark.parametrize(
    ("temp", "top_k", "top_p"),
    [(1.0, 0, 1.0), (0.7, 5, 0.9), (1.3, 0, 0.6)],
    ids=["plain", "k5-p0.9", "p0.6"],
)
def test_draws_follow_the_filtered_softmax(temp: float, top_k: int, top_p: float) -> None:
    """20,000 draws of one small distribution (one per step counter) against softmax."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 0.3])
    n = 20_000
    scores = logits.expand(n, -1)
    noise = gumbel_noise(seeds([42] * n), torch.arange(n), 0, 1, 8)[:, 0]
    toks = draw_rows(scores, settings(n, True, temp, top_k, top_p), noise)
    freq = torch.bincount(toks, minlength=8).double()
    probs = ref_filter(logits / temp, top_k, top_p).softmax(-1).double()
    assert torch.all(freq[probs == 0] == 0)  # filtered tokens never drawn
    keep = probs > 0
    expected = probs[keep] * n
    chi2 = float(((freq[keep] - expected) ** 2 / expected).sum())
    assert chi2 < 30, (chi2, freq.tolist(), expected.tolist())  # <= 7 dof: p ~ 1e-4 at 29.9


def test_draws_are_batch_invariant_and_seeded() -> None:
    """A row draws the same tokens alone or anywhere in any batch; same seed and step:
    same draws, other seed/step/codebook: other draws."""
    gen = torch.Generator().manual_seed(0)
    v = 64
    row = torch.randn(1, v, generator=gen) * 3
    alone_noise = gumbel_noise(seeds([1234]), torch.tensor([5]), 2, 3, v)
    alone = draw_rows(row, settings(1, True, 0.9, 20, 0.95), alone_noise[:, 1])
    for batch, at in ((6, 3), (32, 0), (2, 1)):
        scores = torch.randn(batch, v, generator=gen) * 3
        scores[at] = row[0]
        sd = [random.Random(i).randrange(2**62) for i in range(batch)]
        sd[at] = 1234
        steps = torch.randint(0, 1000, (batch,), generator=gen)
        steps[at] = 5
        noise = gumbel_noise(seeds(sd), steps, 2, 3, v)
        assert torch.equal(noise[at], alone_noise[0])
        s = settings(batch, True, 0.9, 20, 0.95)
        s.do_sample[0] = at == 0  # a greedy neighbour changes nothing
        assert int(draw_rows(scores, s, noise[:, 1])[at]) == int(alone[0])
    base = counter_bits(seeds([1234]), torch.tensor([5]), 0, 2, v)
    assert torch.equal(base, counter_bits(seeds([1234]), torch.tensor([5]), 0, 2, v))
    assert not torch.equal(base, counter_bits(seeds([1235]), torch.tensor([5]), 0, 2, v))
    assert not torch.equal(base, counter_bits(seeds([1234]), torch.tensor([6]), 0, 2, v))
    assert not torch.equal(base[:, 0], base[:, 1])  # codebooks differ
    assert not torch.equal(base, counter_bits(seeds([1234 + 2**32]), torch.tensor([5]), 0, 2, v))


def test_top_k_top_p_equal_the_reference_warpers() -> None:
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    gen = torch.Generator().manual_seed(1)
    v = 300
    combos = [(k, p) for k in (0, 1, 5, 50, v, v + 10) for p in (1.0, 0.95, 0.9, 0.8, 0.5, 0.1)]
    scores = torch.randn(len(combos), v, generator=gen) * 4
    scores[:, 7] = scores[:, 8]  # a tie
    got = filter_top_k_top_p(
        scores,
        torch.tensor([k for k, _ in combos]),
        torch.tensor([1.0 - p for _, p in combos], dtype=torch.float32),
        torch.tensor([p < 1.0 for _, p in combos]),
    )
    for i, (k, p) in enumerate(combos):
        ref = ref_filter(scores[i], k, p)
        assert torch.equal(got[i], ref), (k, p)
        hf = scores[i : i + 1]
        if k > 0:
            hf = TopKLogitsWarper(k)(None, hf)  # type: ignore[arg-type]
        if p < 1.0:
            hf = TopPLogitsWarper(p)(None, hf)  # type: ignore[arg-type]
        assert torch.equal(got[i], hf[0]), (k, p)


def test_talker_processing_and_greedy_equal_the_reference() -> None:
    """Penalty, min_new_tokens and suppression per row are bit-identical to the former
    per-row code, so greedy argmax is unchanged."""
    gen = torch.Generator().manual_seed(2)
    v, eos = 96, 90
    sup = torch.zeros(v, dtype=torch.bool)
    sup[64:] = True
    sup[eos] = False
    eos_mask = torch.zeros(v, dtype=torch.bool)
    eos_mask[eos] = True
    rows = [(1.05, 0, 2), (1.05, 5, 2), (1.0, 3, 0), (1.3, 1, 2), (0.7, 9, 4)]  # (penalty, n, min_new)
    logits = torch.randn(len(rows), v, generator=gen) * 5
    generated = torch.rand(len(rows), v, generator=gen) < 0.2
    generated[0] = False
    got = process_talker_logits(
        logits,
        generated,
        torch.tensor([r[0] for r in rows], dtype=torch.float32),
        torch.tensor([r[1] >= r[2] for r in rows]),
        eos_mask,
        sup,
    )
    for i, (pen, n, min_new) in enumerate(rows):
        ref = ref_process(logits[i], generated[i], n, pen, min_new, eos, sup)
        assert torch.equal(got[i], ref)
        assert int(draw_rows(got, settings(len(rows), False), None)[i]) == int(ref.argmax())


# =============================================================================== settings


def test_fast_path_settings() -> None:
    cpu = FastPath.resolve(CPU)
    assert not cpu.static and not cpu.cuda_graphs and not cpu.captured
    asked = FastPath.resolve(CPU, static=True, cuda_graphs=True)
    assert asked.static and not asked.cuda_graphs  # graphs never off CUDA
    cuda = FastPath.resolve(torch.device("cuda"))
    assert cuda.static and cuda.cuda_graphs and cuda.captured
    with pytest.raises(ValueError, match="static"):
        FastPath.resolve(torch.device("cuda"), static=False, cuda_graphs=True)
    assert default_buckets(16) == (1, 2, 4, 8, 16) and default_buckets(6) == (1, 2, 4, 6)
    assert default_buckets(1) == (1,)
    f = FastPath(static=True, buckets=(3, 1))
    assert f.bucket_list(8) == (3, 1, 8) or f.bucket_list(8) == (1, 3, 8)
    fr = FastPath.resolve(CPU, static=True, buckets=(3, 1))
    assert fr.bucket_list(8) == (1, 3, 8) and [fr.bucket(n, 8) for n in (1, 2, 3, 4, 8)] == [1, 3, 3, 8, 8]
    assert FastPath().bucket(5, 8) == 5  # dynamic: no padding
    assert attention_backend(CPU, torch.float32) == "sdpa"
    assert attention_backend(CPU, torch.bfloat16) == "sdpa"
    with pytest.raises(ValueError, match="flash"):
        attention_backend(CPU, torch.float32, "flash")


# =============================================================================== static == dynamic


@pytest.fixture(scope="module")
def base(tiny_loaded: Callable[..., Checkpoint]) -> Checkpoint:
    return tiny_loaded("base")


@pytest.fixture(scope="module")
def custom(tiny_loaded: Callable[..., Checkpoint]) -> tuple[Checkpoint, VoicePrompt]:
    ckpt = tiny_loaded("custom_voice")
    return ckpt, voice_prompt(ckpt, speaker=ckpt.config.speakers[0])


@torch.inference_mode()
def test_static_cache_logits_equal_dynamic(base: Checkpoint) -> None:
    """Talker and code-predictor logits over a static cache (full span, length mask,
    padded rows on a scratch slot) equal the dynamic cache's within 1e-5."""
    model = base.model
    tc = model.cfg.talker
    gen = torch.Generator().manual_seed(3)
    h = tc.stack.hidden_size
    lens = [9, 3, 14]
    prompts = [torch.randn(1, n + 4, h, generator=gen) * 0.5 for n in lens]
    dyn = model.new_talker_cache(4)
    sta = KVCache.allocate(tc.stack, 5, 64, CPU, model.dtype, static=True)
    slots = [2, 0, 3]
    for p, n, s in zip(prompts, lens, slots):
        for cache in (dyn, sta):
            model.talker_forward(p[:, :n], cache, torch.tensor([s]), torch.tensor([0]))
    for k in range(4):
        x = torch.cat([p[:, n + k : n + k + 1] for p, n in zip(prompts, lens)])
        ln = torch.tensor([n + k for n in lens])
        a = model.codec_logits(model.talker_forward(x, dyn, torch.tensor(slots), ln))
        xp = torch.cat([x, torch.zeros(1, 1, h)])  # a padding row on the scratch slot
        b = model.codec_logits(
            model.talker_forward(
                xp, sta, torch.tensor([*slots, 4]), torch.cat([ln, torch.zeros(1, dtype=torch.long)])
            )
        )
        torch.testing.assert_close(b[:3], a, atol=1e-5, rtol=1e-5)
    pred = model.talker.code_predictor
    hid = torch.randn(4, h, generator=gen)
    c0 = model.codec_embed(torch.tensor([5, 17, 2, 0]))
    seen: dict[str, list[torch.Tensor]] = {"dyn": [], "sta": []}

    def chooser(key: str) -> Callable[[torch.Tensor, int], torch.Tensor]:
        def choose(logits: torch.Tensor, group: int) -> torch.Tensor:
            seen[key].append(logits)
            return logits.argmax(-1)

        return choose

    pcache = KVCache.allocate(tc.code_predictor, 4, tc.num_code_groups + 1, CPU, model.dtype, static=True)
    a = pred.predict(hid, c0, chooser("dyn"), model.new_predictor_cache(4))
    b = pred.predict(hid, c0, chooser("sta"), pcache)
    assert torch.equal(a, b)
    for la, lb in zip(seen["dyn"], seen["sta"]):
        torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-5)


def _states(
    ckpt: Checkpoint, voice: VoicePrompt, jobs: list[tuple[str, SamplingParams, int]]
) -> list[UtteranceState]:
    out = []
    for slot, (text, params, seed) in enumerate(jobs):
        st = new_utterance(ckpt, voice, "english", params, seed=seed, slot=slot)
        st.sched.push(ckpt.tokenizer.text_ids(text))
        st.sched.end()
        st.max_frames = 12
        out.append(st)
    return out


def _generate(
    gen: FrameGenerator, states: list[UtteranceState], join_at: list[int]
) -> list[list[torch.Tensor]]:
    frames: list[list[torch.Tensor]] = [[] for _ in states]
    index = {id(st): i for i, st in enumerate(states)}
    tick = 0
    while any(st.finish is None for st in states):
        live = [st for i, st in enumerate(states) if join_at[i] <= tick and st.finish is None]
        for st, frame in gen.tick(live):
            frames[index[id(st)]].append(frame)
        tick += 1
    return frames


@pytest.mark.parametrize("emulate", [False, True], ids=["static", "captured"])
def test_bucketed_generator_equals_dynamic(custom: tuple[Checkpoint, VoicePrompt], emulate: bool) -> None:
    """Three utterances (greedy and seeded, joining at different ticks: batches of 1..3
    padded to buckets 1, 2, 4) give the same frames on the static path as on the dynamic one."""
    ckpt, voice = custom
    jobs = [(EN, GREEDY, 1), (EN[:25], SAMPLED, 7), ("Short one.", SAMPLED.with_(top_p=0.8), 9)]
    join_at = [0, 2, 3]
    dyn = _generate(FrameGenerator(ckpt.model, 4), _states(ckpt, voice, jobs), join_at)
    fast = FastPath.resolve(CPU, static=True, max_positions=256)
    fast = FastPath(**{**fast.__dict__, "emulate_graphs": emulate})
    gen = FrameGenerator(ckpt.model, 4, fast)
    sta = _generate(gen, _states(ckpt, voice, jobs), join_at)
    for a, b in zip(dyn, sta):
        assert len(a) > 3
        assert torch.equal(torch.stack(a), torch.stack(b))
    if emulate:
        assert {k for k in gen._steps.steps} >= {("talker", 2), ("talker", 4), ("predictor", 4)}


def test_bf16_static_path_runs(tiny_checkpoint: Callable[..., Any]) -> None:
    """bf16 weights through the static path (SDPA on CPU; flash-attn on CUDA is unmeasured
    here) gives valid frames, as the dynamic bf16 path does."""
    from qwen3tts_rt.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint("custom_voice"), dtype="bfloat16")
    voice = voice_prompt(ckpt, speaker=ckpt.config.speakers[0])
    jobs = [(EN, GREEDY, 1), (EN[:25], SAMPLED, 7)]
    dyn = _generate(FrameGenerator(ckpt.model, 2), _states(ckpt, voice, jobs), [0, 1])
    fast = FastPath.resolve(CPU, static=True, max_positions=128)
    sta = _generate(FrameGenerator(ckpt.model, 2, fast), _states(ckpt, voice, jobs), [0, 1])
    for a, b in zip(dyn, sta):
        frames = torch.stack(b)
        assert len(a) > 3 and len(b) > 3 and frames.min() >= 0 and frames.max() < 2048


def test_static_cache_full_ends_the_utterance_as_cap(custom: tuple[Checkpoint, VoicePrompt]) -> None:
    ckpt, voice = custom
    gen = FrameGenerator(ckpt.model, 2, FastPath.resolve(CPU, static=True, max_positions=64))
    (st,) = _states(ckpt, voice, [(EN * 3, GREEDY.with_(max_new_tokens=200), 0)])
    st.max_frames = 200
    frames = _generate(gen, [st], [0])[0]
    assert st.finish is FinishReason.CAP and len(frames) > 0 and st.cache_len == 64


# =============================================================================== decoder pool


@torch.inference_mode()
@pytest.mark.parametrize("emulate", [False, True], ids=["static", "captured"])
def test_decoder_pool_equals_each_stream_alone(base: Checkpoint, emulate: bool) -> None:
    dec = base.codec.decoder
    q = dec.config.num_quantizers
    gen = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 2048, (3, 6, q), generator=gen)
    ref_codes = torch.randint(0, 2048, (4, q), generator=gen)
    alone = []
    for i in range(3):
        st = dec.new_state(1)
        if i == 1:
            dec.decode_step(ref_codes[None], st)
        alone.append(torch.cat([dec.decode_step(codes[i : i + 1, t : t + 1], st) for t in range(6)], dim=1))
    # dynamic, one stream at a time: bit-identical
    pool = DecoderPool(dec, 4, FastPath(), CPU, torch.float32)
    pool.reset(2)
    pool.prime(2, ref_codes)
    one = torch.cat([pool.step([2], codes[1:2, t : t + 1]) for t in range(6)], dim=1)
    assert torch.equal(one, alone[1])
    # static buckets (3 streams padded to 4), slots in any order
    fast = FastPath(static=True, emulate_graphs=emulate)
    pool = DecoderPool(dec, 4, fast, CPU, torch.float32)
    slots = [3, 0, 1]
    for s in slots:
        pool.reset(s)
    pool.prime(0, ref_codes)
    out = torch.cat([pool.step(slots, codes[:, t : t + 1]) for t in range(6)], dim=1)
    torch.testing.assert_close(out, torch.cat(alone), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("static", [False, True])
def test_decoder_pool_with_mixed_packet_sizes_equals_one_frame_steps(base: Checkpoint, static: bool) -> None:
    """Slots stepped t frames at a time, batched with the slots of the same t in each step
    (as the engine groups them), one slot primed from a reference: the audio of every
    slot equals its one-frame-at-a-time decode."""
    dec = base.codec.decoder
    q = dec.config.num_quantizers
    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 2048, (3, 12, q), generator=gen)
    ref_codes = torch.randint(0, 2048, (4, q), generator=gen)
    layouts = {0: [1, 2, 1, 8], 2: [1, 3, 3, 5], 3: [1, 1, 8, 2]}  # slot -> packet sizes (12 frames)
    row = {0: 0, 2: 1, 3: 2}
    fast = FastPath(static=True) if static else FastPath()
    ref = DecoderPool(dec, 4, FastPath(), CPU, torch.float32)
    pool = DecoderPool(dec, 4, fast, CPU, torch.float32)
    want = {}
    for p in (ref, pool):
        for slot in layouts:
            p.reset(slot)
        p.prime(2, ref_codes)
    for slot in layouts:
        want[slot] = torch.cat(
            [ref.step([slot], codes[row[slot] : row[slot] + 1, i : i + 1]) for i in range(12)], 1
        )
    got: dict[int, list[torch.Tensor]] = {slot: [] for slot in layouts}
    done = dict.fromkeys(layouts, 0)
    for k in range(4):  # step k: every slot's k-th packet, grouped by size
        by_t: dict[int, list[int]] = {}
        for slot, sizes in layouts.items():
            by_t.setdefault(sizes[k], []).append(slot)
        for t, slots in by_t.items():
            batch = torch.stack([codes[row[s], done[s] : done[s] + t] for s in slots])
            for s, wav in zip(slots, pool.step(slots, batch)):
                got[s].append(wav[None])
                done[s] += t
    for slot in layouts:
        torch.testing.assert_close(torch.cat(got[slot], 1), want[slot], atol=1e-5, rtol=1e-5)


# =============================================================================== engine


def _collect(s: Session) -> tuple[np.ndarray, np.ndarray, list[str]]:
    packets, reasons = [], []
    for m in s.messages(timeout=60):
        if isinstance(m, PcmPacket):
            packets.append(m)
        elif isinstance(m, UtteranceDone):
            reasons.append(m.reason)
        elif isinstance(m, SessionError):
            raise AssertionError(m.message)
    return np.concatenate([p.codes for p in packets]), np.concatenate([p.pcm for p in packets]), reasons


@contextmanager
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def boom(*_: Any, **__: Any) -> Any:
        raise AssertionError("a CUDA API was called on the CPU path")

    for name in (
        "CUDAGraph",
        "Stream",
        "graph",
        "graph_pool_handle",
        "current_stream",
        "synchronize",
        "stream",
    ):
        monkeypatch.setattr(torch.cuda, name, boom)
    yield


@pytest.mark.parametrize("emulate", [False, True], ids=["static", "captured"])
def test_engine_on_the_static_path(
    custom: tuple[Checkpoint, VoicePrompt], monkeypatch: pytest.MonkeyPatch, emulate: bool
) -> None:
    """The engine on the static path (graphs asked for: ignored on CPU, no CUDA API
    touched) streams the frames of ``synthesize``, alone and three sessions at once."""
    ckpt, voice = custom
    jobs = [(EN, GREEDY, None), (EN[:30], SAMPLED, 5), ("And a third.", SAMPLED, 11)]
    refs = [synthesize(ckpt, voice, t, "english", p, seed=sd) for t, p, sd in jobs]
    cfg = EngineConfig(max_sessions=4, static_kv=True, cuda_graphs=True, max_positions=256)
    if emulate:
        real = EngineConfig.fast_path
        monkeypatch.setattr(
            EngineConfig,
            "fast_path",
            lambda self, dev: FastPath(**{**real(self, dev).__dict__, "emulate_graphs": True}),
        )
    with no_cuda(monkeypatch):
        eng = Engine(ckpt, cfg)
        try:
            assert eng.fast.static and not eng.fast.cuda_graphs
            eng.warmup()
            eng.warmup()  # safe twice
            s = eng.open_session(voice, "english", GREEDY)
            s.push_text(EN)
            s.end_text()
            codes, pcm, reasons = _collect(s)
            np.testing.assert_array_equal(codes, refs[0].frames.numpy())
            np.testing.assert_allclose(pcm, refs[0].wav, atol=1e-5)
            assert reasons == [refs[0].finish.value]
            sessions = [eng.open_session(voice, "english", p, seed=sd) for _, p, sd in jobs]
            for s, (t, _, _) in zip(sessions, jobs):
                for piece in re.findall(r"\S+\s*", t):  # word by word
                    s.push_text(piece)
                s.end_text()
            for s, ref in zip(sessions, refs):
                codes, pcm, _ = _collect(s)
                np.testing.assert_array_equal(codes, ref.frames.numpy())
                np.testing.assert_allclose(pcm, ref.wav, atol=1e-4)
        finally:
            eng.shutdown()


# =============================================================================== capturability


@contextmanager
def forbid_host_sync(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """What would break a CUDA-graph capture, made to fail loudly on CPU: reading a tensor
    on the host, building a tensor from host data."""

    def boom(*_: Any, **__: Any) -> Any:
        raise AssertionError("host sync / host-to-device copy inside a captured step")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
            m.setattr(torch.Tensor, name, boom)
        for name in ("tensor", "as_tensor", "from_numpy"):
            m.setattr(torch, name, boom)
        yield


@torch.inference_mode()
def test_captured_steps_never_read_the_host(
    custom: tuple[Checkpoint, VoicePrompt], monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt, voice = custom
    fast = FastPath(static=True, max_positions=128, emulate_graphs=True)
    gen = FrameGenerator(ckpt.model, 4, fast)
    pool = DecoderPool(ckpt.codec.decoder, 4, fast, CPU, torch.float32)
    gen.warmup()
    pool.warmup()
    states = _states(ckpt, voice, [(EN, SAMPLED, 1), (EN, GREEDY, 2), (EN, SAMPLED.with_(top_p=0.7), 3)])
    gen.tick(states)  # prefill (eager, not captured) + the first frames: all in ADVANCE now
    for size in (1, 2, 4):
        batch = states[: min(size, 3)]
        for name, talker in (("talker", True), ("predictor", False)):
            ints, floats = gen._pack(batch, size, talker=talker)
            with forbid_host_sync(monkeypatch):
                gen._steps.steps[(name, size)](ints, floats)
        idx = torch.tensor([0] * size)
        codes = torch.zeros(size, 1, ckpt.codec.decoder.config.num_quantizers, dtype=torch.long)
        with forbid_host_sync(monkeypatch):
            pool._steps.steps[("decoder1", size)](idx, codes)
    # the detector works: the dynamic path reads lengths on the host
    dyn = FrameGenerator(ckpt.model, 4)
    ints, floats = dyn._pack(states[:2], 2, talker=True)
    with forbid_host_sync(monkeypatch), pytest.raises(AssertionError, match="host sync"):
        dyn._talker_step(ints, floats)


# =============================================================================== GPU only


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda_only
def test_gpu_graphs_equal_eager_and_cpu(tiny_checkpoint: Callable[..., Any]) -> None:  # pragma: no cover
    """fp32 on CUDA: captured graphs give the frames of the eager static path and of the
    CPU dynamic path (greedy), and the engine streams what synthesize gives."""
    from qwen3tts_rt.model.checkpoint import load_checkpoint

    path = tiny_checkpoint("custom_voice")
    cpu, gpu = load_checkpoint(path), load_checkpoint(path, device="cuda")
    voice = voice_prompt(cpu, speaker=cpu.config.speakers[0])
    ref = synthesize(cpu, voice, EN, "english", GREEDY)
    eager = synthesize(gpu, voice, EN, "english", GREEDY)
    assert torch.equal(eager.frames, ref.frames)
    eng = Engine(gpu, EngineConfig(max_sessions=4))
    try:
        assert eng.fast.cuda_graphs
        eng.warmup()
        s = eng.open_session(voice, "english", GREEDY)
        s.push_text(EN)
        s.end_text()
        codes, pcm, _ = _collect(s)
        np.testing.assert_array_equal(codes, ref.frames.numpy())
        np.testing.assert_allclose(pcm, eager.wav, atol=1e-5)
    finally:
        eng.shutdown()
