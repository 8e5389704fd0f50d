"""The memory suite: bytes autograd saves for backward and peak memory of one training step, per
contender, for the cases of the layer/mlp/loss suites (`manualbp.bench.suites`)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import Tensor

from manualbp.bench.cases import Case
from manualbp.bench.common import Env, Row, base_row, case_generator, linear_params, randn, short_error
from manualbp.bench.contenders import Contender
from manualbp.bench.suites import UNAVAILABLE_FUSED, loss_inputs
from manualbp.bench.timing import synchronize

__all__ = ["memory_case"]


def _saved_and_peak(
    forward: Callable[[], Tensor],
    backward: Callable[[Tensor], object],
    owned: Sequence[Tensor],
    device: torch.device,
) -> tuple[int, int, float]:
    """Bytes the autograd graph saves (unique storages), those beyond the inputs and parameters,
    and on CUDA the peak memory of forward+backward above what was allocated before."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    owned_ptrs = {t.untyped_storage().data_ptr() for t in owned}
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    backward(out)
    synchronize(device)
    peak = float(torch.cuda.max_memory_allocated(device) - before) if device.type == "cuda" else math.nan
    saved = sum(storages.values())
    extra = sum(n for ptr, n in storages.items() if ptr not in owned_ptrs)
    return saved, extra, peak


def _memory_row(case: Case, kind: str, variant: str, name: str, measured: tuple[int, int, float]) -> Row:
    saved, extra, peak = measured
    row = base_row(case, "fwd+bwd", variant, name)
    row.update(suite="memory", op=kind, status="ok", note="", saved_bytes=saved, saved_activation_bytes=extra)
    if not math.isnan(peak):
        row["peak_bytes"] = peak
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
        measured = _saved_and_peak(
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
        measured = _saved_and_peak(
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
        measured = _saved_and_peak(
            functools.partial(cast(Callable[..., Tensor], fn), *leaves, targets[0]),
            functools.partial(_grad_of, inputs=leaves),
            [*leaves, targets[0]],
            device,
        )
        rows.append(_memory_row(case, "loss", variant, name, measured))
    return rows


def _grad_of(loss: Tensor, inputs: list[Tensor]) -> object:
    return torch.autograd.grad(loss, inputs)
