"""The memory suite: bytes autograd saves for backward, bytes kept after the forward, and peak
memory of one forward + backward, per contender, for the cases of the layer/mlp/loss suites
(`manualbp.bench.suites`); and the allocation-event peak that experiments/bench_memory.py uses.

Peak memory on CPU comes from the profiler's allocation events (`profile_memory=True`): each
event carries a signed size, and the running sum's maximum is the peak above the start."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from manualbp.bench.cases import Case
from manualbp.bench.common import Env, Row, base_row, case_generator, linear_params, randn, short_error
from manualbp.bench.contenders import Contender
from manualbp.bench.suites import UNAVAILABLE_FUSED, loss_inputs
from manualbp.bench.timing import synchronize

__all__ = [
    "Allocations",
    "Measured",
    "allocations",
    "measure_memory",
    "memory_case",
    "peak_bytes",
    "running_peak",
]


@dataclass(frozen=True)
class Allocations:
    """Allocation events of one stretch of work: the highest running total above the start and
    the total at its end (bytes still allocated then), both relative to the start."""

    peak: int
    net: int

    def then(self, later: Allocations) -> Allocations:
        """This stretch followed by `later`: the later peak starts from this net."""
        return Allocations(max(self.peak, self.net + later.peak), self.net + later.net)


def running_peak(nbytes: Sequence[int]) -> Allocations:
    """Peak and net of signed allocation sizes in time order (allocations +, frees −)."""
    total = peak = 0
    for n in nbytes:
        total += n
        peak = max(peak, total)
    return Allocations(peak, total)


def allocations(fn: Callable[[], object], device: torch.device) -> tuple[Allocations, object]:
    """Run `fn` under the profiler's memory recording; (its allocations on `device`, its result).

    The CPU allocator caches nothing, so its events are the process's real allocations; events
    of other devices are left out.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        result = fn()
        synchronize(device)
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type().name.lower() == device.type
    ]
    events.sort(key=lambda e: e.start_ns())
    return running_peak([e.nbytes() for e in events]), result


def peak_bytes(step: Callable[[], object], device: torch.device) -> tuple[int, int | None]:
    """(peak above the start from allocation events; on CUDA also max_memory_allocated above the
    start, else None) of one call of `step`."""
    cuda_peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    measured, _ = allocations(step, device)
    if device.type == "cuda":
        cuda_peak = torch.cuda.max_memory_allocated(device) - base
    return measured.peak, cuda_peak


@dataclass(frozen=True)
class Measured:
    saved: int  # bytes of the storages autograd's saved-tensor hooks saw
    extra: int  # those beyond the inputs and parameters
    retained: int  # bytes allocated by the forward and still allocated after it (output included)
    peak: int  # highest memory above the start during forward + backward


def _saved(forward: Callable[[], Tensor], backward: Callable[[Tensor], object],
           owned: Sequence[Tensor]) -> tuple[int, int]:  # fmt: skip
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    owned_ptrs = {t.untyped_storage().data_ptr() for t in owned}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    backward(out)
    extra = sum(n for ptr, n in storages.items() if ptr not in owned_ptrs)
    return sum(storages.values()), extra


def measure_memory(
    forward: Callable[[], Tensor],
    backward: Callable[[Tensor], object],
    owned: Sequence[Tensor],
    device: torch.device,
) -> Measured:
    """Saved-tensor bytes (a first forward + backward, which also warms up lazy state), then what
    a second one keeps after its forward and its peak: CUDA from the caching allocator's
    statistics, CPU from the profiler's allocation events. Whatever mechanism a contender uses to
    keep tensors for backward (save_for_backward, ctx attributes, closures), `retained` sees it,
    where the saved-tensor hooks see only the first."""
    saved, extra = _saved(forward, backward, owned)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = forward()
        synchronize(device)
        retained = torch.cuda.memory_allocated(device) - before
        backward(out)
        del out
        synchronize(device)
        return Measured(saved, extra, retained, torch.cuda.max_memory_allocated(device) - before)
    first, loss = allocations(forward, device)
    second, _ = allocations(functools.partial(backward, cast(Tensor, loss)), device)
    return Measured(saved, extra, first.net, first.then(second).peak)


# Why saved bytes can read 0: torch's chunked F.linear_cross_entropy computes its gradients in the
# forward and keeps them as attributes of its autograd context, which saved-tensor hooks never see.
HIDDEN_SAVES = (
    "saved-tensor hooks saw nothing: it keeps what backward needs outside save_for_backward; "
    "'kept after forward' counts it"
)


def _memory_row(case: Case, kind: str, variant: str, name: str, measured: Measured) -> Row:
    row = base_row(case, "fwd+bwd", variant, name)
    row.update(suite="memory", op=kind, status="ok", note="", saved_bytes=measured.saved,
               saved_activation_bytes=measured.extra, retained_bytes=measured.retained,
               peak_bytes=measured.peak)  # fmt: skip
    if measured.saved == 0 and measured.retained > 0:
        row["note"] = HIDDEN_SAVES
    return row


def memory_case(case: Case, contenders: Sequence[Contender], env: Env, tick: Callable[[], None]) -> list[Row]:
    """Saved-tensor bytes and peak memory of one forward+backward, per contender.

    `case.suite` says what is measured: a layer, an MLP (loss included) or the linear + loss head.
    """
    gen = case_generator(env, case)
    rows: list[Row] = []
    for contender in contenders:
        name = contender.name
        reason = contender.case_reason(env.device, case)
        if reason is not None:
            rows += [
                {
                    **base_row(case, case.suite, "", name),
                    "suite": "memory",
                    "status": "skipped",
                    "note": reason,
                }
            ]
            tick()
            continue
        with contender.context():
            try:
                rows += _memory_contender(case, contender, env, gen)
            except Exception as e:
                rows += [
                    {
                        **base_row(case, case.suite, "", name),
                        "suite": "memory",
                        "status": "error",
                        "note": short_error(e),
                    }
                ]
        tick()
    return rows


def _memory_contender(case: Case, contender: Contender, env: Env, gen: torch.Generator) -> list[Row]:
    name, device = contender.name, env.device
    if case.suite == "layer":
        weight, bias = linear_params(gen, case.K, case.N, case, env)
        module = contender.build_layer(weight, bias, case.activation)
        x = randn(gen, (case.M, case.K), case, env).requires_grad_()
        grad_out = randn(gen, (case.M, case.N), case, env)
        params = list(module.parameters())
        measured = measure_memory(
            lambda: module(x),
            lambda out: torch.autograd.grad(out, [x, *params], grad_out),
            [x, *params],
            device,
        )
        return [_memory_row(case, "layer", "", name, measured)]
    if case.suite == "mlp":
        sizes = case.sizes()
        weights, biases = zip(*(linear_params(gen, a, b, case, env) for a, b in zip(sizes[:-1], sizes[1:])))
        model, params = contender.build_mlp(weights, biases, case.activation)
        x = randn(gen, (case.M, case.K), case, env)
        target = randn(gen, (case.M, case.N), case, env)
        measured = measure_memory(
            lambda: contender.mse(model(x), target),
            lambda loss: torch.autograd.grad(loss, params),
            [x, target, *params],
            device,
        )
        return [_memory_row(case, "mlp", "", name, measured)]
    weight, bias, xs, targets = loss_inputs(case, env)
    rows = []
    for variant, fn in contender.loss_variants().items():
        if fn is None:
            note = UNAVAILABLE_FUSED
            row = {
                **base_row(case, "loss", variant, name),
                "suite": "memory",
                "status": "unavailable",
                "note": note,
            }
            rows.append(row)
            continue
        leaves = [
            xs[0].clone().requires_grad_(),
            weight.clone().requires_grad_(),
            bias.clone().requires_grad_(),
        ]
        measured = measure_memory(
            functools.partial(cast(Callable[..., Tensor], fn), *leaves, targets[0]),
            functools.partial(_grad_of, inputs=leaves),
            [*leaves, targets[0]],
            device,
        )
        rows.append(_memory_row(case, "loss", variant, name, measured))
    return rows


def _grad_of(loss: Tensor, inputs: list[Tensor]) -> object:
    return torch.autograd.grad(loss, inputs)
