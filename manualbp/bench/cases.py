"""A benchmark case (suite, shape, dtype, activation), its FLOP count and its minimal traffic.

Shapes follow the layer's GEMMs: M rows (batch × leading dims), N output features, K input
features. For the MLP, K is the input width, N the width of each of its `depth` layers; for the
loss, N is the number of classes.

FLOPs count the GEMMs only (2 per multiply-add); the elementwise work is O(M·N), negligible next
to O(M·N·K). Minimal bytes count each tensor that must cross memory once at its storage size:
a lower bound no implementation can beat, whatever it fuses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Case", "MlpCell", "TOLERANCES", "dtype_name", "parse_dtype"]

#: Relative error ‖ours − ref‖ / ‖ref‖ a contender may show, per storage dtype, when the
#: reference is native autograd in float64 (or in the same dtype where float64 is too costly).
TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}

_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp64": torch.float64,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def parse_dtype(name: str) -> torch.dtype:
    key = name.lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(
            f"dtypes: unknown dtype {name!r}; expected one of float64, float32, float16, bfloat16"
        )
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Case:
    suite: str  # "layer", "mlp" or "loss"
    M: int
    N: int
    K: int
    dtype: torch.dtype
    activation: str
    depth: int = 1
    threads: int | None = None  # CPU: only under this thread count (None: under each of the run's)

    @property
    def label(self) -> str:
        shape = f"{self.M}x{self.N}x{self.K}"
        return f"{shape}xL{self.depth}" if self.suite == "mlp" else shape

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def sizes(self) -> list[int]:
        """MLP layer widths [K, N, ..., N] (`depth` layers)."""
        return [self.K] + [self.N] * self.depth

    def parameter_count(self) -> int:
        sizes = self.sizes()
        return sum(n_in * n_out + n_out for n_in, n_out in zip(sizes[:-1], sizes[1:]))

    def flops(self, op: str) -> float:
        M, N, K = self.M, self.N, self.K
        if self.suite == "layer":
            gemms = {"forward": 1, "backward": 2, "fwd+bwd": 3}[op]
            return 2.0 * M * N * K * gemms
        if self.suite == "mlp":
            sizes = self.sizes()
            total = sum(6.0 * M * a * b for a, b in zip(sizes[:-1], sizes[1:]))
            return total - 2.0 * M * K * N  # the input needs no gradient
        if self.suite == "loss":
            return 6.0 * M * N * K  # logits; grad_weight; grad_input
        raise ValueError(f"suite: expected layer, mlp or loss, got {self.suite!r}")

    def min_bytes(self, op: str) -> float:
        M, N, K, s = self.M, self.N, self.K, self.itemsize
        if self.suite == "layer":
            forward = M * K + N * K + N + M * N  # read x, W, b; write a
            # read grad_out, the saved a or z, x, W; write grad_input, grad_weight, grad_bias
            backward = 2 * M * N + 2 * M * K + 2 * N * K + N
            # fused end to end: read x, W, b, grad_out; write a and the three gradients
            both = 2 * M * K + 2 * N * K + 2 * N + 2 * M * N
            return float(s * {"forward": forward, "backward": backward, "fwd+bwd": both}[op])
        if self.suite == "mlp":
            # input and target read once; each hidden activation written in forward and read in
            # backward; every parameter read once and written once (a fused SGD update)
            hidden = sum(M * width for width in self.sizes()[1:-1])
            return float(s * (M * K + M * N + 2 * hidden + 2 * self.parameter_count()))
        if self.suite == "loss":
            # the logits (M × N) need never reach memory: that is what the fused head is for
            return float(s * (2 * M * K + 2 * N * K + 2 * N) + 8 * M)  # + int64 targets
        raise ValueError(f"suite: expected layer, mlp or loss, got {self.suite!r}")


@dataclass(frozen=True)
class MlpCell:
    """A sampled part of the mlp suite's grid: one shape (batch, width, input width) under some
    depths, activations, dtypes and thread counts; an empty tuple means the run's own list.
    Where the full product of the grid would take too long (the wide, large-batch corner), a
    few cells sample it."""

    shape: tuple[int, int, int]
    depths: tuple[int, ...] = ()
    activations: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = ()
    threads: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> MlpCell:
        """``BxW[:DEPTHS[:ACTIVATIONS[:DTYPES[:THREADS]]]]``, each list comma-separated, ``*`` or
        nothing for the run's own (e.g. ``4096x2048:2:relu,gelu:float32:1``); MxNxK for a shape
        whose input width differs."""
        fields = text.split(":")
        if len(fields) > 5:
            raise ValueError(
                f"mlp cell: expected BxW[:depths[:activations[:dtypes[:threads]]]], got {text!r}"
            )
        parts = fields[0].lower().split("x")
        try:
            dims = [int(p) for p in parts]
            lists = [[] if f in ("", "*") else f.split(",") for f in fields[1:]] + [[]] * (5 - len(fields))
            depths, threads = (tuple(int(v) for v in lists[i]) for i in (0, 3))
        except ValueError:
            dims, depths, threads = [], (), ()
        if len(dims) == 2:
            dims.append(dims[1])
        if len(dims) != 3 or min(dims) < 1 or min((*depths, *threads), default=1) < 1:
            raise ValueError(
                f"mlp cell: expected BxW or MxNxK and positive depths/threads "
                f"(e.g. 4096x2048:2:relu:float32:1), got {text!r}"
            )
        dtypes = tuple(parse_dtype(d) for d in lists[2])
        return cls((dims[0], dims[1], dims[2]), depths, tuple(lists[1]), dtypes, threads)
