"""Decoding codec frames packet by packet, two ways, timed on the same frames:

* ours: the exact streaming decoder (conv history and attention window carried in the
  per-stream state), each packet decodes only its own frames: plain (``decode_step``) or as
  the engine runs it (a slot of a ``DecoderPool``, one frame per step);
* the peers' way (the official ``chunked_decode(.., 25)``, faster-qwen3-tts, early
  vLLM-Omni): each packet re-decodes ``left_context`` (25) frames before it, statelessly.

Used by ``benchmarks.engine_cost`` (per-frame stage costs) and ``benchmarks.concurrency``
(baseline (c) of the concurrency benchmark).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from qwen3tts_rt.model.codec import CodecDecoder
from qwen3tts_rt.model.decoder_pool import DecoderPool

PEER_LEFT_CONTEXT = 25  # frames re-decoded before each packet (official chunked_decode(300, 25))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@torch.inference_mode()
def streaming_decode_costs(
    decoder: CodecDecoder, codes: torch.Tensor, bounds: Sequence[tuple[int, int]], dtype: torch.dtype
) -> list[float]:
    """Seconds per packet of the streaming decoder over ``codes`` [T, G] (on the decoder's
    device), one fresh stream state, packets ``bounds`` ([start, end) frame ranges)."""
    dev = codes.device
    state = decoder.new_state(1, dev, dtype)
    out = []
    for s, e in bounds:
        sync(dev)
        t0 = time.perf_counter()
        decoder.decode_step(codes[None, s:e], state)
        sync(dev)
        out.append(time.perf_counter() - t0)
    return out


@torch.inference_mode()
def pool_decode_costs(
    pool: DecoderPool, codes: torch.Tensor, bounds: Sequence[tuple[int, int]], slot: int = 0
) -> list[float]:
    """Seconds per packet as the engine decodes: slot ``slot`` of ``pool`` reset, then one
    ``pool.step`` per packet (the engine decodes a packet's frames in one call)."""
    dev = codes.device
    pool.reset(slot)
    out = []
    for s, e in bounds:
        sync(dev)
        t0 = time.perf_counter()
        pool.step([slot], codes[None, s:e])
        sync(dev)
        out.append(time.perf_counter() - t0)
    return out


@torch.inference_mode()
def redecode_costs(
    decoder: CodecDecoder,
    codes: torch.Tensor,
    bounds: Sequence[tuple[int, int]],
    left_context: int = PEER_LEFT_CONTEXT,
) -> list[float]:
    """Seconds per packet when each packet ``[s, e)`` is decoded the peers' way: one
    stateless decode of frames ``[max(0, s - left_context), e)`` (the context's samples
    are then thrown away)."""
    dev = codes.device
    out = []
    for s, e in bounds:
        sync(dev)
        t0 = time.perf_counter()
        decoder.decode(codes[None, max(0, s - left_context) : e])
        sync(dev)
        out.append(time.perf_counter() - t0)
    return out
