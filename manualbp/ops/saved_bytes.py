"""Measuring what autograd saves for backward (tests and benchmarks compare it with native)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["SavedBytes", "saved_tensor_bytes"]


@dataclass
class SavedBytes:
    """What autograd saved for backward, by distinct storage (views of one storage count once)."""

    storages: dict[int, int] = field(default_factory=dict)  # data_ptr -> bytes
    references: int = 0  # every tensor packed, including repeats and excluded ones

    @property
    def count(self) -> int:
        return len(self.storages)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def saved_tensor_bytes(run: Callable[[], Any], exclude: Sequence[Tensor] = ()) -> SavedBytes:
    """Call `run()` and record every tensor autograd saves for backward while it runs.

    Tensors are identified by their storage, so a view and its base, or the same tensor saved by
    two nodes, count once. Storages of `exclude` (the parameters, the caller's input — memory the
    caller holds anyway) are left out. Measured with `torch.autograd.graph.saved_tensors_hooks`.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    result = SavedBytes()

    def pack(t: Tensor) -> Tensor:
        result.references += 1
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip and storage.nbytes() > 0:
            result.storages[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        # Hold the output (and so the graph and every saved tensor) until all packing is done,
        # so no saved storage is freed and its address reused by a later one.
        output = run()
    del output
    return result
