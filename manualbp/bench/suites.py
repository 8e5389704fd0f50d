"""The suites: for one case, check every contender against native autograd, then time them.

Each suite function builds the case's inputs once (seeded), computes the reference (native
autograd, in float64 when that is cheap), checks each contender, and then times each operation
for all checked contenders together (`common.time_group`: interleaved on CPU). It returns one
row per contender and operation. A contender whose output or gradients differ from the
reference beyond the dtype's tolerance gets an ``error`` row carrying the error, and is not timed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from manualbp.bench.cases import Case, dtype_name
from manualbp.bench.common import (
    Env,
    Pending,
    Reference,
    Row,
    base_row,
    case_generator,
    cycle,
    linear_params,
    max_rel_error,
    randn,
    reference_of,
    short_error,
    status_rows,
    time_group,
    up,
)
from manualbp.bench.contenders import Contender, NativeContender
from manualbp.bench.timing import rotations

__all__ = ["Env", "LAYER_OPS", "Reference", "loss_inputs", "max_rel_error", "run_case"]

LAYER_OPS = ("forward", "backward", "fwd+bwd")
UNAVAILABLE_FUSED = (
    "not available: neither manualbp.functional.linear_cross_entropy nor "
    "manualbp.ops.heads.linear_cross_entropy exists (yet)"
)


# -------------------------------------------------------------------------------------- layer


Slot = Row | Pending  # a finished row (skipped, error) or an operation waiting to be timed
Slots = list[tuple[str, Slot]]  # (op, slot) of one contender


def _status_slots(case: Case, ops: Sequence[str], variant: str, name: str, status: str, note: str) -> Slots:
    return [(row["op"], row) for row in status_rows(case, ops, variant, name, status, note)]


def _pending(
    case: Case,
    op: str,
    variant: str,
    contender: Contender,
    fn: Callable[[], object],
    err: float,
    reference: Reference,
    **hooks: Callable[[], None],
) -> tuple[str, Pending]:
    row = {**base_row(case, op, variant, contender.name), "max_rel_err": err,
           "reference": dtype_name(reference.dtype)}  # fmt: skip
    return op, Pending(row, fn, contender.context, **hooks)


def _time_slots(case: Case, ops: Sequence[str], slots: Slots, env: Env) -> list[Row]:
    """Rows op by op, contenders in order; the pending ones of each op timed as one group."""
    rows: list[Row] = []
    for op in ops:
        group = [slot for slot_op, slot in slots if slot_op == op]
        timed = iter(time_group(case, op, [s for s in group if isinstance(s, Pending)], env))
        rows += [next(timed) if isinstance(s, Pending) else s for s in group]
    return rows


# -------------------------------------------------------------------------------------- layer


def _layer_case(case: Case, contenders: Sequence[Contender], env: Env, tick: Callable[[], None]) -> list[Row]:
    gen = case_generator(env, case)
    M, N, K = case.M, case.N, case.K
    weight, bias = linear_params(gen, K, N, case, env)
    n_sets = rotations(case.itemsize * (M * K + 2 * M * N), env.device)
    xs = [randn(gen, (M, K), case, env).requires_grad_() for _ in range(n_sets)]
    grad_outs = [randn(gen, (M, N), case, env) for _ in range(n_sets)]

    def native_outputs(dtype: torch.dtype) -> list[Tensor]:
        native = NativeContender().build_layer(up(weight, dtype), up(bias, dtype), case.activation)
        return _layer_outputs(native, up(xs[0], dtype, grad=True), grad_outs[0].to(dtype))

    names = ["output", "grad_input", "grad_weight", "grad_bias"]
    reference = reference_of(case, env, names, native_outputs)
    slots: Slots = []
    for contender in contenders:
        slots += _layer_contender(case, contender, env, weight, bias, xs, grad_outs, reference)
        tick()
    return _time_slots(case, LAYER_OPS, slots, env)


def _layer_outputs(module: torch.nn.Module, x: Tensor, grad_out: Tensor) -> list[Tensor]:
    out = module(x)
    return [out, *torch.autograd.grad(out, [x, *module.parameters()], grad_out)]


def _layer_contender(
    case: Case,
    contender: Contender,
    env: Env,
    weight: Tensor,
    bias: Tensor,
    xs: list[Tensor],
    grad_outs: list[Tensor],
    reference: Reference,
) -> Slots:
    name = contender.name
    reason = contender.case_reason(env.device, case)
    if reason is not None:
        return _status_slots(case, LAYER_OPS, "", name, "skipped", reason)
    with contender.context():
        try:
            module = contender.build_layer(weight, bias, case.activation)
            params = list(module.parameters())
            got = _layer_outputs(module, xs[0], grad_outs[0])
        except Exception as e:
            return _status_slots(case, LAYER_OPS, "", name, "error", short_error(e))
        err, wrong = reference.gate(got, case)
        if wrong is not None:
            return _status_slots(case, LAYER_OPS, "", name, "error", wrong)
        del got

    index = cycle(len(xs))
    outs: list[Tensor] = []  # one retained graph per input set, only while backward is timed

    def forward() -> object:
        return module(xs[index()])

    def retain_graphs() -> None:
        outs.extend(module(x) for x in xs)

    def backward() -> object:
        i = index()
        return torch.autograd.grad(outs[i], [xs[i], *params], grad_outs[i], retain_graph=True)

    def forward_backward() -> object:
        i = index()
        return torch.autograd.grad(module(xs[i]), [xs[i], *params], grad_outs[i])

    return [
        _pending(case, "forward", "", contender, forward, err, reference),
        _pending(
            case,
            "backward",
            "",
            contender,
            backward,
            err,
            reference,
            prepare=retain_graphs,
            release=outs.clear,
        ),  # fmt: skip
        _pending(case, "fwd+bwd", "", contender, forward_backward, err, reference),
    ]


# ---------------------------------------------------------------------------------------- mlp


def _mlp_case(case: Case, contenders: Sequence[Contender], env: Env, tick: Callable[[], None]) -> list[Row]:
    gen = case_generator(env, case)
    sizes = case.sizes()
    weights, biases = zip(*(linear_params(gen, a, b, case, env) for a, b in zip(sizes[:-1], sizes[1:])))
    n_sets = rotations(case.itemsize * case.M * (case.K + case.N), env.device)
    xs = [randn(gen, (case.M, case.K), case, env) for _ in range(n_sets)]
    targets = [randn(gen, (case.M, case.N), case, env) for _ in range(n_sets)]

    def native_outputs(dtype: torch.dtype) -> list[Tensor]:
        native = NativeContender()
        model, params = native.build_mlp(
            [up(w, dtype) for w in weights], [up(b, dtype) for b in biases], case.activation
        )
        return _mlp_outputs(native, model, params, xs[0].to(dtype), targets[0].to(dtype))

    names = ["loss"] + [f"layers.{i}.{kind}.grad" for i in range(case.depth) for kind in ("weight", "bias")]
    reference = reference_of(case, env, names, native_outputs)
    slots: Slots = []
    for contender in contenders:
        slots += _mlp_contender(case, contender, env, weights, biases, xs, targets, reference)
        tick()
    return _time_slots(case, ("train_step",), slots, env)


def _mlp_outputs(
    contender: Contender, model: torch.nn.Module, params: list[torch.nn.Parameter], x: Tensor, target: Tensor
) -> list[Tensor]:
    loss = contender.mse(model(x), target)
    return [loss, *torch.autograd.grad(loss, params)]


def _mlp_contender(
    case: Case,
    contender: Contender,
    env: Env,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    xs: list[Tensor],
    targets: list[Tensor],
    reference: Reference,
) -> Slots:
    name, ops = contender.name, ("train_step",)
    reason = contender.case_reason(env.device, case)
    if reason is not None:
        return _status_slots(case, ops, "", name, "skipped", reason)
    with contender.context():
        try:
            model, params = contender.build_mlp(weights, biases, case.activation)
            got = _mlp_outputs(contender, model, params, xs[0], targets[0])
        except Exception as e:
            return _status_slots(case, ops, "", name, "error", short_error(e))
        err, wrong = reference.gate(got, case)
        if wrong is not None:
            return _status_slots(case, ops, "", name, "error", wrong)

    # Plain SGD, foreach: the optimizer is the same for every contender.
    optimizer = torch.optim.SGD(params, lr=1e-4)
    index = cycle(len(xs))

    def train_step() -> object:
        i = index()
        optimizer.zero_grad(set_to_none=True)
        step_loss = contender.mse(model(xs[i]), targets[i])
        step_loss.backward()
        optimizer.step()
        return step_loss

    return [_pending(case, "train_step", "", contender, train_step, err, reference)]


# --------------------------------------------------------------------------------------- loss


def loss_inputs(case: Case, env: Env) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
    gen = case_generator(env, case)
    weight, bias = linear_params(gen, case.K, case.N, case, env)
    n_sets = rotations(case.itemsize * case.M * case.K + 8 * case.M, env.device)
    xs = [randn(gen, (case.M, case.K), case, env) for _ in range(n_sets)]
    targets = [torch.randint(0, case.N, (case.M,), generator=gen).to(env.device) for _ in range(n_sets)]
    return weight, bias, xs, targets


def _native_loss(x: Tensor, w: Tensor, b: Tensor, t: Tensor) -> Tensor:
    return F.cross_entropy(F.linear(x, w, b), t)


def _loss_case(case: Case, contenders: Sequence[Contender], env: Env, tick: Callable[[], None]) -> list[Row]:
    weight, bias, xs, targets = loss_inputs(case, env)

    def native_outputs(dtype: torch.dtype) -> list[Tensor]:
        return _loss_outputs(_native_loss, up(xs[0], dtype), up(weight, dtype), up(bias, dtype), targets[0])

    names = ["loss", "grad_input", "grad_weight", "grad_bias"]
    reference = reference_of(case, env, names, native_outputs)
    inputs = (weight, bias, xs, targets)
    slots: Slots = []
    for contender in contenders:
        reason = contender.case_reason(env.device, case)
        if reason is not None:
            slots += _status_slots(case, ("fwd+bwd",), "", contender.name, "skipped", reason)
            tick()
            continue
        with contender.context():
            try:
                variants = contender.loss_variants()
            except Exception as e:
                slots += _status_slots(case, ("fwd+bwd",), "", contender.name, "error", short_error(e))
                tick()
                continue
            for variant, fn in variants.items():
                slots.append(_loss_contender(case, contender, variant, fn, inputs, reference))
        tick()
    return _time_slots(case, ("fwd+bwd",), slots, env)


def _loss_contender(
    case: Case,
    contender: Contender,
    variant: str,
    fn: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] | None,
    inputs: tuple[Tensor, Tensor, list[Tensor], list[Tensor]],
    reference: Reference,
) -> tuple[str, Slot]:
    row = base_row(case, "fwd+bwd", variant, contender.name)
    if fn is None:
        return "fwd+bwd", {**row, "status": "unavailable", "note": UNAVAILABLE_FUSED}
    weight, bias, xs, targets = inputs
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    xs = [x.clone().requires_grad_() for x in xs]
    try:
        got = _loss_outputs(fn, xs[0], w, b, targets[0])
    except Exception as e:
        return "fwd+bwd", {**row, "status": "error", "note": short_error(e)}
    err, wrong = reference.gate(got, case)
    if wrong is not None:
        return "fwd+bwd", {**row, "status": "error", "note": wrong}
    index = cycle(len(xs))

    def forward_backward() -> object:
        i = index()
        return torch.autograd.grad(fn(xs[i], w, b, targets[i]), [xs[i], w, b])

    return _pending(case, "fwd+bwd", variant, contender, forward_backward, err, reference)


def _loss_outputs(fn: Callable[..., Tensor], x: Tensor, w: Tensor, b: Tensor, target: Tensor) -> list[Tensor]:
    """Loss and its gradients for x, W, b (fresh leaves, so the caller's tensors stay untouched)."""
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    loss = fn(*leaves, target)
    return [loss, *torch.autograd.grad(loss, leaves)]


SUITE_FUNCTIONS = {"layer": _layer_case, "mlp": _mlp_case, "loss": _loss_case}


def run_case(case: Case, contenders: Sequence[Contender], env: Env, tick: Callable[[], None]) -> list[Row]:
    """All rows of one timing case (suite layer, mlp or loss)."""
    return SUITE_FUNCTIONS[case.suite](case, contenders, env, tick)
