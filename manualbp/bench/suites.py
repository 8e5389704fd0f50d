"""The suites: for one case, check every contender against native autograd, then time it.

Each suite function builds the case's inputs once (seeded), computes the reference (native
autograd, in float64 when that is cheap), and returns one row per contender and operation. A
contender whose output or gradients differ from the reference beyond the dtype's tolerance gets
an ``error`` row carrying the error, and is not timed.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from manualbp.bench.cases import TOLERANCES, Case, dtype_name
from manualbp.bench.contenders import Contender, NativeContender
from manualbp.bench.timing import Ceilings, measure, rotations

__all__ = ["Env", "LAYER_OPS", "max_rel_error", "run_case"]

LAYER_OPS = ("forward", "backward", "fwd+bwd")
UNAVAILABLE_FUSED = (
    "not available: neither manualbp.functional.linear_cross_entropy nor "
    "manualbp.ops.heads.linear_cross_entropy exists (yet)"
)
Row = dict[str, Any]


@dataclass
class Env:
    """Run-wide settings every suite needs."""

    device: torch.device
    warmup_ms: float
    rep_ms: float
    ceilings: Ceilings | None
    seed: int = 0
    ref64_max_flops: float = 2e10  # float64 reference only below this many FLOPs (CPU)


# ------------------------------------------------------------------------------------ helpers


def short_error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text[:240]


def max_rel_error(
    got: Sequence[Tensor | None], ref: Sequence[Tensor], names: Sequence[str]
) -> tuple[float, str]:
    """The worst ‖got − ref‖ / ‖ref‖ over the tensors (computed in float64) and its tensor's name.

    A missing tensor, a shape mismatch or a non-finite value counts as an infinite error.
    """
    worst, worst_name = 0.0, names[0]
    for g, r, name in zip(got, ref, names):
        if g is None or g.shape != r.shape:
            return math.inf, name
        g64, r64 = g.detach().double(), r.detach().double()
        if not torch.isfinite(g64).all():
            return math.inf, name
        scale = float(r64.norm())
        err = float((g64 - r64).norm()) / (scale if scale > 0 else 1.0)
        if err > worst:
            worst, worst_name = err, name
    return worst, worst_name


def case_generator(env: Env, case: Case) -> torch.Generator:
    # One stream per case, so a case's inputs do not depend on which cases ran before it.
    key = f"{env.seed}:{case.suite}:{case.M}:{case.N}:{case.K}:{case.depth}"
    seed = zlib.crc32(key.encode())  # not hash(): str hashes change from process to process
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(gen: torch.Generator, shape: tuple[int, ...], case: Case, env: Env, scale: float = 1.0) -> Tensor:
    # Drawn on the CPU in float32 (reproducible across devices), then moved and cast.
    return (torch.randn(shape, generator=gen) * scale).to(device=env.device, dtype=case.dtype)


def linear_params(
    gen: torch.Generator, n_in: int, n_out: int, case: Case, env: Env
) -> tuple[Tensor, Tensor]:
    bound = 1 / math.sqrt(n_in)  # nn.Linear's initialisation range
    weight = (torch.rand((n_out, n_in), generator=gen) * 2 - 1) * bound
    bias = (torch.rand((n_out,), generator=gen) * 2 - 1) * bound
    return (
        weight.to(device=env.device, dtype=case.dtype),
        bias.to(device=env.device, dtype=case.dtype),
    )


def _reference_dtype(case: Case, env: Env) -> torch.dtype:
    """float64 wherever it is cheap (always on CUDA), else the case's own dtype."""
    cost = case.flops("fwd+bwd" if case.suite != "mlp" else "train_step")
    cheap = env.device.type == "cuda" or cost <= env.ref64_max_flops
    return torch.float64 if cheap else case.dtype


def _up(t: Tensor, dtype: torch.dtype, grad: bool = False) -> Tensor:
    t = t.detach().to(dtype)
    return t.requires_grad_() if grad else t


def base_row(case: Case, op: str, variant: str, contender: str) -> Row:
    return {
        "suite": case.suite,
        "case": case.label,
        "M": case.M,
        "N": case.N,
        "K": case.K,
        "depth": case.depth,
        "dtype": dtype_name(case.dtype),
        "activation": case.activation if case.suite != "loss" else "",
        "op": op,
        "variant": variant,
        "contender": contender,
    }


def _status_rows(
    case: Case, ops: Sequence[str], variant: str, name: str, status: str, note: str
) -> list[Row]:
    return [{**base_row(case, op, variant, name), "status": status, "note": note} for op in ops]


def _timed_row(
    case: Case, op: str, variant: str, name: str, fn: Callable[[], object], env: Env, err: float, ref: str
) -> Row:
    row = base_row(case, op, variant, name)
    try:
        timing = measure(fn, env.device, env.warmup_ms, env.rep_ms)
    except Exception as e:  # a contender that cannot run this op is an error row, not a crash
        return {**row, "status": "error", "note": short_error(e)}
    seconds = timing.median_ms / 1e3
    flops, min_bytes = case.flops(op), case.min_bytes(op)
    row.update(
        status="ok",
        note="",
        median_ms=timing.median_ms,
        q20_ms=timing.q20_ms,
        q80_ms=timing.q80_ms,
        tflops=flops / seconds / 1e12,
        gbps=min_bytes / seconds / 1e9,
        flops=flops,
        min_bytes=min_bytes,
        max_rel_err=err,
        reference=ref,
    )
    if env.ceilings is not None:
        floor, bound = env.ceilings.floor_seconds(flops, min_bytes, case.dtype)
        row.update(floor_ms=floor * 1e3, floor_bound=bound, floor_frac=floor / seconds)
    return row


@dataclass
class Reference:
    """What every contender of a case is checked against.

    `tensors` come from native autograd in `dtype` (float64 where cheap); `native_error` is native
    eager's own error against them in the case's dtype. A contender passes when its error is within
    the dtype's tolerance or within twice native's own error: in bfloat16 a deep MLP's rounding
    can exceed a fixed tolerance for native itself, while a wrong kernel misses by far more.
    """

    tensors: list[Tensor]
    names: list[str]
    dtype: torch.dtype
    native_error: float = 0.0

    def gate(self, got: Sequence[Tensor | None], case: Case) -> tuple[float, str | None]:
        """(error, None) when `got` passes, else (error, the error row's note)."""
        err, where = max_rel_error(got, self.tensors, self.names)
        allowed = max(TOLERANCES[case.dtype], 2 * self.native_error)
        if err <= allowed:
            return err, None
        return err, (
            f"wrong result: rel. error {err:.3g} in {where} > allowed {allowed:.3g} "
            f"({dtype_name(case.dtype)} vs native in {dtype_name(self.dtype)}; "
            f"native's own error {self.native_error:.3g})"
        )


def _reference(
    case: Case, env: Env, names: list[str], outputs: Callable[[torch.dtype], list[Tensor]]
) -> Reference:
    """Native's outputs in the reference dtype, and native's own error in the case's dtype."""
    ref_dtype = _reference_dtype(case, env)
    reference = Reference([t.detach() for t in outputs(ref_dtype)], names, ref_dtype)
    if ref_dtype != case.dtype:
        reference.native_error, _ = max_rel_error(outputs(case.dtype), reference.tensors, names)
    return reference


def _cycle(n: int) -> Callable[[], int]:
    counter = itertools.cycle(range(n))
    return lambda: next(counter)


# -------------------------------------------------------------------------------------- layer


def _layer_case(case: Case, contenders: Sequence[Contender], env: Env, tick: Callable[[], None]) -> list[Row]:
    gen = case_generator(env, case)
    M, N, K = case.M, case.N, case.K
    weight, bias = linear_params(gen, K, N, case, env)
    n_sets = rotations(case.itemsize * (M * K + 2 * M * N), env.device)
    xs = [randn(gen, (M, K), case, env).requires_grad_() for _ in range(n_sets)]
    grad_outs = [randn(gen, (M, N), case, env) for _ in range(n_sets)]

    def native_outputs(dtype: torch.dtype) -> list[Tensor]:
        native = NativeContender().build_layer(_up(weight, dtype), _up(bias, dtype), case.activation)
        return _layer_outputs(native, _up(xs[0], dtype, grad=True), grad_outs[0].to(dtype))

    names = ["output", "grad_input", "grad_weight", "grad_bias"]
    reference = _reference(case, env, names, native_outputs)
    rows: list[Row] = []
    for contender in contenders:
        rows += _layer_contender(case, contender, env, weight, bias, xs, grad_outs, reference)
        tick()
    return rows


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
) -> list[Row]:
    name, ref = contender.name, dtype_name(reference.dtype)
    reason = contender.case_reason(env.device, case)
    if reason is not None:
        return _status_rows(case, LAYER_OPS, "", name, "skipped", reason)
    with contender.context():
        try:
            module = contender.build_layer(weight, bias, case.activation)
            params = list(module.parameters())
            got = _layer_outputs(module, xs[0], grad_outs[0])
        except Exception as e:
            return _status_rows(case, LAYER_OPS, "", name, "error", short_error(e))
        err, wrong = reference.gate(got, case)
        if wrong is not None:
            return _status_rows(case, LAYER_OPS, "", name, "error", wrong)
        del got

        index = _cycle(len(xs))

        def forward() -> object:
            return module(xs[index()])

        rows = [_timed_row(case, "forward", "", name, forward, env, err, ref)]

        try:
            outs = [module(x) for x in xs]  # one retained graph per input set
        except Exception as e:
            return rows + _status_rows(case, LAYER_OPS[1:], "", name, "error", short_error(e))

        def backward() -> object:
            i = index()
            return torch.autograd.grad(outs[i], [xs[i], *params], grad_outs[i], retain_graph=True)

        rows.append(_timed_row(case, "backward", "", name, backward, env, err, ref))
        outs.clear()  # free the retained graphs before the next timing

        def forward_backward() -> object:
            i = index()
            return torch.autograd.grad(module(xs[i]), [xs[i], *params], grad_outs[i])

        rows.append(_timed_row(case, "fwd+bwd", "", name, forward_backward, env, err, ref))
    return rows


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
            [_up(w, dtype) for w in weights], [_up(b, dtype) for b in biases], case.activation
        )
        return _mlp_outputs(native, model, params, xs[0].to(dtype), targets[0].to(dtype))

    names = ["loss"] + [f"layers.{i}.{kind}.grad" for i in range(case.depth) for kind in ("weight", "bias")]
    reference = _reference(case, env, names, native_outputs)
    rows: list[Row] = []
    for contender in contenders:
        rows += _mlp_contender(case, contender, env, weights, biases, xs, targets, reference)
        tick()
    return rows


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
) -> list[Row]:
    name, ref, ops = contender.name, dtype_name(reference.dtype), ("train_step",)
    reason = contender.case_reason(env.device, case)
    if reason is not None:
        return _status_rows(case, ops, "", name, "skipped", reason)
    with contender.context():
        try:
            model, params = contender.build_mlp(weights, biases, case.activation)
            got = _mlp_outputs(contender, model, params, xs[0], targets[0])
        except Exception as e:
            return _status_rows(case, ops, "", name, "error", short_error(e))
        err, wrong = reference.gate(got, case)
        if wrong is not None:
            return _status_rows(case, ops, "", name, "error", wrong)

        # Plain SGD, foreach: the optimizer is the same for every contender.
        optimizer = torch.optim.SGD(params, lr=1e-4)
        index = _cycle(len(xs))

        def train_step() -> object:
            i = index()
            optimizer.zero_grad(set_to_none=True)
            step_loss = contender.mse(model(xs[i]), targets[i])
            step_loss.backward()
            optimizer.step()
            return step_loss

        return [_timed_row(case, "train_step", "", name, train_step, env, err, ref)]


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
        return _loss_outputs(
            _native_loss, _up(xs[0], dtype), _up(weight, dtype), _up(bias, dtype), targets[0]
        )

    names = ["loss", "grad_input", "grad_weight", "grad_bias"]
    reference = _reference(case, env, names, native_outputs)

    rows: list[Row] = []
    for contender in contenders:
        reason = contender.case_reason(env.device, case)
        if reason is not None:
            rows += _status_rows(case, ("fwd+bwd",), "", contender.name, "skipped", reason)
            tick()
            continue
        with contender.context():
            try:
                variants = contender.loss_variants()
            except Exception as e:
                rows += _status_rows(case, ("fwd+bwd",), "", contender.name, "error", short_error(e))
                tick()
                continue
            for variant, fn in variants.items():
                rows.append(
                    _loss_contender(
                        case, contender.name, variant, fn, env, weight, bias, xs, targets, reference
                    )
                )
        tick()
    return rows


def _loss_contender(
    case: Case,
    name: str,
    variant: str,
    fn: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] | None,
    env: Env,
    weight: Tensor,
    bias: Tensor,
    xs: list[Tensor],
    targets: list[Tensor],
    reference: Reference,
) -> Row:
    if fn is None:
        note = UNAVAILABLE_FUSED
        return {**base_row(case, "fwd+bwd", variant, name), "status": "unavailable", "note": note}
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    xs = [x.clone().requires_grad_() for x in xs]
    try:
        got = _loss_outputs(fn, xs[0], w, b, targets[0])
    except Exception as e:
        return {**base_row(case, "fwd+bwd", variant, name), "status": "error", "note": short_error(e)}
    err, wrong = reference.gate(got, case)
    if wrong is not None:
        return {**base_row(case, "fwd+bwd", variant, name), "status": "error", "note": wrong}
    index = _cycle(len(xs))

    def forward_backward() -> object:
        i = index()
        return torch.autograd.grad(fn(xs[i], w, b, targets[i]), [xs[i], w, b])

    return _timed_row(case, "fwd+bwd", variant, name, forward_backward, env, err, dtype_name(reference.dtype))


def _loss_outputs(fn: Callable[..., Tensor], x: Tensor, w: Tensor, b: Tensor, target: Tensor) -> list[Tensor]:
    """Loss and its gradients for x, W, b (fresh leaves, so the caller's tensors stay untouched)."""
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    loss = fn(*leaves, target)
    return [loss, *torch.autograd.grad(loss, leaves)]


SUITE_FUNCTIONS = {"layer": _layer_case, "mlp": _mlp_case, "loss": _loss_case}


def run_case(case: Case, contenders: Sequence[Contender], env: Env, tick: Callable[[], None]) -> list[Row]:
    """All rows of one timing case (suite layer, mlp or loss)."""
    return SUITE_FUNCTIONS[case.suite](case, contenders, env, tick)
