"""Second-order training of a manualbp MLP: Levenberg–Marquardt on hand-built Jacobians.

For residuals r(θ) = model(x) − y (all N examples × O outputs, flattened) the mean squared error
is ‖r‖² / (N·O). Gauss–Newton replaces the Hessian of ½‖r‖² by JᵀJ, J = ∂r/∂θ; Levenberg–Marquardt
damps it, solving each iteration

    (JᵀJ + λ D) Δ = −Jᵀr,     D = diag(JᵀJ) (Marquardt's scaling) or I,

and moves θ ← θ + Δ only if the loss goes down. A rejected step restores θ and retries with
λ·`damping_up`; an accepted one divides λ by `damping_down`. Large λ gives a short gradient-descent
step, small λ a Gauss–Newton step, so the loss sequence of `step` never increases.

J comes from :func:`manualbp.jacobian.residual_jacobian`: the backward's δ·aᵀ products kept per
example and output instead of summed. Memory is the bound: J has N·O·P entries (N examples, O
outputs, P parameters), so LM suits small models fitted full-batch — a 1-10-1 net on 1000 points
is 31 000 numbers; `max_jacobian_elements` (default 2.5·10⁷) turns a batch that would not fit
into a clear error instead of an out-of-memory. The P×P normal equations are solved in float64
(`solve_dtype`) by Cholesky, with a least-squares fallback when Cholesky fails or gives a
non-finite step, or when its pivots say the matrix is too ill-conditioned to trust
(``LMStats.solver`` records which one ran).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from manualbp.jacobian import DEFAULT_MAX_JACOBIAN_ELEMENTS, check_mlp, residual_jacobian
from manualbp.nn import MLP

__all__ = ["LevenbergMarquardt", "LMStats", "SCALINGS"]

#: How D is chosen: "marquardt" — diag(JᵀJ), invariant to rescaling parameters; "identity" — I.
SCALINGS = ("marquardt", "identity")

# Marquardt's D = diag(JᵀJ) is zero for a parameter the batch cannot move (a dead ReLU unit);
# floor it relative to the largest entry so the damped matrix stays positive definite.
_MIN_RELATIVE_DIAG = 1e-12


@dataclass
class LMStats:
    """What the last `step` did: losses before/after, damping used, retries and the solver."""

    loss_before: float = math.nan
    loss_after: float = math.nan
    damping: float = math.nan
    rejected: int = 0
    accepted: bool = False
    solver: str = ""


def _positive(
    name: str, value: object, *, above_one: bool = False, allow_zero: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    value = float(value)
    low_ok = value >= 0 if allow_zero else value > 0
    if not math.isfinite(value) or not low_ok or (above_one and value <= 1):
        bound = "> 1" if above_one else (">= 0" if allow_zero else "> 0")
        raise ValueError(f"{name}: expected a finite number {bound}, got {value}")
    return value


class LevenbergMarquardt:
    """Levenberg–Marquardt for a :class:`manualbp.MLP` under mean squared error, full batch.

    ``loss = opt.step(x, y)`` does one iteration on examples ``x`` (N, in) and targets ``y``
    (N, out) and returns the MSE after it (a float). Unlike a ``torch.optim.Optimizer`` it needs
    no ``backward()``: it builds the residual Jacobian itself.

    Args:
        model: a manualbp ``MLP``; every parameter is updated.
        damping: initial λ (ignored, kept at 0, with ``gauss_newton=True``).
        damping_up: factor on λ after a rejected step (> 1).
        damping_down: λ is divided by it after an accepted step (> 1).
        scaling: ``"marquardt"`` (D = diag JᵀJ) or ``"identity"`` (D = I).
        max_retries: rejected steps tried per call before giving up; the parameters are then
            left as they were and the loss returned is the loss before the call.
        min_damping, max_damping: λ is kept within these bounds.
        gauss_newton: λ = 0 and every step taken (no acceptance test): the plain Gauss–Newton
            iteration, which converges fast near a good fit but may increase the loss.
        loss: only ``"mse"``; anything else is rejected (the method needs squared residuals).
        max_jacobian_elements: bound on N·O·P; ``step`` raises ValueError beyond it.
        solve_dtype: dtype of the normal equations (float64 by default, whatever the model's).
    """

    def __init__(
        self,
        model: MLP,
        damping: float = 1e-3,
        *,
        damping_up: float = 10.0,
        damping_down: float = 10.0,
        scaling: str = "marquardt",
        max_retries: int = 10,
        min_damping: float = 1e-12,
        max_damping: float = 1e12,
        gauss_newton: bool = False,
        loss: str = "mse",
        max_jacobian_elements: int | None = DEFAULT_MAX_JACOBIAN_ELEMENTS,
        solve_dtype: torch.dtype = torch.float64,
    ) -> None:
        self.model = check_mlp(model)
        if loss != "mse":
            raise ValueError(
                f"loss: Levenberg–Marquardt minimises a sum of squared residuals; expected 'mse', "
                f"got {loss!r} (use a first-order torch.optim optimizer for other losses)"
            )
        if scaling not in SCALINGS:
            raise ValueError(f"scaling: expected one of {', '.join(SCALINGS)}, got {scaling!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries: expected an int >= 0, got {max_retries!r}")
        if max_jacobian_elements is not None and (
            isinstance(max_jacobian_elements, bool)
            or not isinstance(max_jacobian_elements, int)
            or max_jacobian_elements < 1
        ):
            raise ValueError(
                "max_jacobian_elements: expected a positive int or None, "
                f"got {max_jacobian_elements!r}"
            )
        if not isinstance(solve_dtype, torch.dtype) or not solve_dtype.is_floating_point:
            raise TypeError(f"solve_dtype: expected a floating torch.dtype, got {solve_dtype!r}")
        self.min_damping = _positive("min_damping", min_damping)
        self.max_damping = _positive("max_damping", max_damping)
        if self.min_damping > self.max_damping:
            raise ValueError(
                f"min_damping: expected <= max_damping={self.max_damping}, got {self.min_damping}"
            )
        self.damping_up = _positive("damping_up", damping_up, above_one=True)
        self.damping_down = _positive("damping_down", damping_down, above_one=True)
        self.gauss_newton = bool(gauss_newton)
        initial = _positive("damping", damping, allow_zero=True)
        clamped = min(max(initial, self.min_damping), self.max_damping)
        self.damping = 0.0 if self.gauss_newton else clamped
        self.scaling = scaling
        self.max_retries = max_retries
        self.max_jacobian_elements = max_jacobian_elements
        self.solve_dtype = solve_dtype
        self.last = LMStats()

    # ------------------------------------------------------------------------------- pieces

    def _loss(self, x: Tensor, y: Tensor) -> float:
        """MSE of the current parameters: forward only, no graph."""
        with torch.no_grad():
            diff = self.model(x).to(self.solve_dtype) - y.to(self.solve_dtype)
            return float((diff * diff).mean())

    @staticmethod
    def _well_conditioned(factor: Tensor) -> bool:
        """Whether the Cholesky factor L of A = LLᵀ can be trusted. cond(A) = cond(L)² and a
        triangular L has cond(L) ≥ max Lᵢᵢ / min Lᵢᵢ, so a pivot ratio² below eps·P proves A
        too ill-conditioned for the normal equations in this dtype (the test is free)."""
        pivots = factor.diagonal()
        ratio = float(pivots.min() / pivots.max()) ** 2
        return ratio > torch.finfo(factor.dtype).eps * factor.shape[0]

    def _solve(self, jtj: Tensor, rhs: Tensor, scale: Tensor, damping: float) -> tuple[Tensor, str]:
        """Δ from (JᵀJ + λD) Δ = rhs: Cholesky, or least squares when that fails."""
        system = jtj + torch.diag(damping * scale) if damping > 0 else jtj
        factor, info = torch.linalg.cholesky_ex(system)
        if int(info) == 0 and self._well_conditioned(factor):
            step = torch.cholesky_solve(rhs.unsqueeze(1), factor).squeeze(1)
            if bool(torch.isfinite(step).all()):
                return step, "cholesky"
        # Singular or too ill-conditioned for Cholesky: the minimum-norm least-squares solution
        # (gelsd, SVD-based, on the CPU; CUDA only offers gels, which assumes full rank).
        driver = "gelsd" if system.device.type == "cpu" else None
        step = torch.linalg.lstsq(system, rhs.unsqueeze(1), driver=driver).solution.squeeze(1)
        return step, "lstsq"

    # ------------------------------------------------------------------------------- step

    def step(self, x: Tensor, y: Tensor) -> float:
        """One LM iteration on the full batch (x, y); returns the MSE after it."""
        params = list(self.model.parameters())
        residual, jacobian = residual_jacobian(
            self.model, x, y, max_elements=self.max_jacobian_elements
        )
        residual, jacobian = residual.to(self.solve_dtype), jacobian.to(self.solve_dtype)
        # Judge steps by one measure: the model's own forward, before and after.
        loss_before = self._loss(x, y)
        jtj = jacobian.t() @ jacobian
        rhs = -(jacobian.t() @ residual)  # −Jᵀr, the negative gradient of ½‖r‖²
        if self.scaling == "marquardt":
            diag = jtj.diagonal()
            scale = diag.clamp_min(_MIN_RELATIVE_DIAG * float(diag.max().clamp_min(1e-300)))
        else:
            scale = torch.ones_like(rhs)
        start = parameters_to_vector(params).detach().clone()

        rejected = 0
        while True:
            delta, solver = self._solve(jtj, rhs, scale, self.damping)
            vector_to_parameters(start + delta.to(start.dtype), params)
            loss_after = self._loss(x, y)
            if self.gauss_newton:
                self.last = LMStats(loss_before, loss_after, 0.0, 0, True, solver)
                return loss_after
            if loss_after < loss_before:  # accepted: trust the quadratic model more
                used = self.damping
                self.damping = max(self.damping / self.damping_down, self.min_damping)
                self.last = LMStats(loss_before, loss_after, used, rejected, True, solver)
                return loss_after
            # Rejected (a worse or non-finite loss): restore θ, damp harder, try again.
            vector_to_parameters(start, params)
            rejected += 1
            if rejected > self.max_retries or self.damping >= self.max_damping:
                self.last = LMStats(loss_before, loss_before, self.damping, rejected, False, solver)
                return loss_before
            self.damping = min(self.damping * self.damping_up, self.max_damping)

    def state_dict(self) -> dict[str, float]:
        """The damping, so a run can resume where it stopped."""
        return {"damping": self.damping}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.damping = 0.0 if self.gauss_newton else float(state["damping"])

    def __repr__(self) -> str:
        mode = "gauss_newton" if self.gauss_newton else f"damping={self.damping:g}"
        return f"LevenbergMarquardt({mode}, scaling={self.scaling!r})"
