"""Fixed-shape steps for batch-size buckets, and their CUDA-graph capture.

A per-frame step (talker step, the code predictor's 15 steps, the decoder step) is a
function of a few input tensors whose shapes depend only on the batch size. Padding the
batch to a bucket (1, 2, 4, 8, ... up to the number of slots) gives a handful of shapes;
``CapturedStep`` records one such step once per bucket into a ``torch.cuda.CUDAGraph``
and later replays it after copying the new inputs into its static input buffers.

Rules a captured function obeys (checked on CPU by tests/test_fast_path.py, which replays
the same plumbing eagerly and forbids host reads while it runs):

* it reads only its input tensors and long-lived tensors (caches, per-slot tables) that are
  never reallocated, and writes its side effects into those;
* no host synchronisation (``.item()``, ``.cpu()``, ``bool(tensor)``), no host-to-device
  copies, no shapes that depend on values;
* Python-level branches depend only on shapes and constants (they are frozen at capture).

Nothing in this module touches CUDA unless ``FastPath.cuda_graphs`` is true, which
``FastPath.resolve`` allows only on a CUDA device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_MAX_POSITIONS = 2048


def default_buckets(slots: int) -> tuple[int, ...]:
    """Powers of two below ``slots``, then ``slots`` itself: 6 -> (1, 2, 4, 6)."""
    out, b = [], 1
    while b < slots:
        out.append(b)
        b *= 2
    out.append(slots)
    return tuple(out)


@dataclass(frozen=True)
class FastPath:
    """How the frame generator and the decoder pool run their per-frame steps.

    ``static``: preallocated KV caches (``max_positions`` talker positions per slot) and
    batches padded to ``buckets`` with idle rows on a scratch slot, so each step has one
    shape per bucket. ``cuda_graphs``: those steps are captured and replayed as CUDA graphs
    (CUDA only). ``emulate_graphs``: tests only, any device: the captured-step plumbing
    (static buffers, replay) runs eagerly. ``attention``: 'auto' | 'sdpa' | 'flash'.
    """

    static: bool = False
    max_positions: int = DEFAULT_MAX_POSITIONS
    buckets: tuple[int, ...] = ()
    cuda_graphs: bool = False
    emulate_graphs: bool = False
    attention: str = "auto"

    @classmethod
    def resolve(
        cls,
        device: torch.device,
        *,
        static: bool | None = None,
        cuda_graphs: bool | None = None,
        max_positions: int = DEFAULT_MAX_POSITIONS,
        buckets: Sequence[int] = (),
        attention: str = "auto",
    ) -> FastPath:
        """Settings for ``device``: ``None`` means on for CUDA, off elsewhere. CUDA graphs
        are never used off CUDA, whatever is asked, and need the static path."""
        cuda = device.type == "cuda"
        static = cuda if static is None else static
        graphs = cuda if cuda_graphs is None else cuda_graphs
        if graphs and cuda and not static:
            raise ValueError("cuda_graphs needs the static KV cache (static_kv)")
        if max_positions < 64:
            raise ValueError("max_positions must be >= 64")
        if any(b < 1 for b in buckets):
            raise ValueError("batch buckets must be >= 1")
        return cls(
            static=static,
            max_positions=max_positions,
            buckets=tuple(sorted(set(buckets))),
            cuda_graphs=graphs and cuda,
            attention=attention,
        )

    @property
    def captured(self) -> bool:
        """Steps go through ``CapturedStep`` (real graphs or their eager emulation)."""
        return self.static and (self.cuda_graphs or self.emulate_graphs)

    def bucket_list(self, slots: int) -> tuple[int, ...]:
        """The bucket sizes for a pool of ``slots`` (always ending with ``slots``)."""
        given = tuple(b for b in self.buckets if b < slots)
        return (*given, slots) if self.buckets else default_buckets(slots)

    def bucket(self, rows: int, slots: int) -> int:
        """Rows a step of ``rows`` live rows runs with: ``rows`` itself on the dynamic path,
        else the smallest bucket that holds them."""
        if not self.static:
            return rows
        for b in self.bucket_list(slots):
            if b >= rows:
                return b
        raise ValueError(f"{rows} rows exceed the {slots} slots")


class CapturedStep:
    """``fn(*inputs) -> output`` run on static input buffers, as a CUDA graph or eagerly.

    ``example`` gives the input shapes/dtypes/devices and the values used while capturing
    (they must be harmless to run: rows on the scratch slot). A call copies its inputs into
    the buffers, replays, and returns a copy of the output (so a later replay of any graph
    sharing the memory pool cannot overwrite what the caller holds).
    """

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        example: Sequence[torch.Tensor],
        *,
        cuda_graph: bool,
        pool: Any = None,
        warmup_runs: int = 2,
    ) -> None:
        self.fn = fn
        self.inputs = [t.clone() for t in example]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None
        if cuda_graph:
            # Warm-up runs on a side stream (lazy initialisations, cuBLAS workspaces, the
            # caching allocator's blocks), then capture.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup_runs):
                    fn(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: another thread's CUDA work (e.g. a voice being encoded) neither
            # breaks the capture nor is refused while it runs.
            with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
                self.output = fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        assert len(inputs) == len(self.inputs)
        for buf, x in zip(self.inputs, inputs):
            buf.copy_(x, non_blocking=True)
        if self.graph is None:
            return self.fn(*self.inputs).clone()
        self.graph.replay()
        assert self.output is not None
        return self.output.clone()


class StepCache:
    """Captured steps keyed by (name, bucket), captured on first use or in ``warmup``.
    All graphs share one memory pool: steps run one at a time on one stream and every
    caller gets a copy of the output, so their intermediates may overlap safely."""

    def __init__(self, fast: FastPath) -> None:
        self.fast = fast
        self.steps: dict[tuple[str, int], CapturedStep] = {}
        self._pool: Any = None

    def get(
        self,
        name: str,
        bucket: int,
        fn: Callable[..., torch.Tensor],
        example: Callable[[], list[torch.Tensor]],
    ) -> CapturedStep:
        key = (name, bucket)
        step = self.steps.get(key)
        if step is None:
            graph = self.fast.cuda_graphs
            if graph and self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            step = self.steps[key] = CapturedStep(fn, example(), cuda_graph=graph, pool=self._pool)
        return step
