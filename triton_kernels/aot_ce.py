"""Ahead-of-time compilation of the cross-entropy kernel (`cross_entropy.py`) with each set of its
option flags, as `aot_gated.py` does for the gated MLP, for GPUs this machine does not have.

    python -m manualbp.triton_kernels.aot_ce --arch 90 80 --json

Every variant: arch × logits dtype × flag set (forward only; with the gradient; class weights
and label smoothing; z-loss and softcap; everything; probability targets with everything), for
a large-vocabulary row (C = 50257: 4096-wide tiles, 8 warps) and a small one (C = 1000, 4
warps), specialised as Triton's binder specialises a real launch of `cross_entropy_rows` on
stand-in tensors. Each cubin goes through `aot.check`: it compiles, and nothing spills. This
also compiles what the interpreter cannot check: that each flag combination types in compiled
Triton. Must run WITHOUT TRITON_INTERPRET.
"""

from __future__ import annotations

from . import aot, aot_gated, aot_launch

#: flag set name → cross_entropy_rows keyword arguments (grad: a gradient is written)
FLAG_SETS: dict[str, dict] = {
    "fwd": {},
    "grad": dict(grad=True),
    "grad+weight+smooth": dict(grad=True, weight=True, label_smoothing=0.1),
    "grad+zloss+softcap": dict(grad=True, lse_square_scale=1e-4, softcap=30.0),
    "grad+all": dict(grad=True, weight=True, label_smoothing=0.1, lse_square_scale=1e-4, softcap=30.0),
    "prob+grad+all": dict(prob=True, grad=True, weight=True, label_smoothing=0.1,
                          lse_square_scale=1e-4, softcap=30.0),  # fmt: skip
}
CLASSES = {"w8": 50257, "w4": 1000}  # config name → classes of the stand-in rows
ROWS = 64


def variants(archs=aot.ARCHS) -> list[tuple[aot.Variant, int]]:
    return [
        (aot.Variant("cross_entropy", arch, dtype, "-", flags, config, False), 0)
        for arch in archs
        for dtype in aot.DTYPES
        for flags in FLAG_SETS
        for config in CLASSES
    ]


def _call_launcher(variant: aot.Variant) -> None:
    """`cross_entropy_rows` on contiguous stand-in CPU tensors (inside a capture)."""
    import torch

    from .cross_entropy import cross_entropy_rows

    dt = aot_gated._torch_dtype(variant.dtype)
    classes = CLASSES[variant.config]
    opts = dict(FLAG_SETS[variant.flags])
    grad, prob, weight = opts.pop("grad", False), opts.pop("prob", False), opts.pop("weight", False)
    logits = torch.empty(ROWS, classes, dtype=dt)
    target = torch.empty(ROWS, classes, dtype=dt) if prob else torch.empty(ROWS, dtype=torch.long)
    rows = torch.empty(ROWS, dtype=torch.float32)
    cross_entropy_rows(
        logits, target, rows if grad else None, weight=torch.empty(classes) if weight else None,
        z_scale=rows if grad else None, **opts,
    )  # fmt: skip


def specialization(variant: aot.Variant, index: int) -> tuple[object, dict]:
    """(kernel, what a launch of `variant` compiles), derived by Triton's binder."""
    from . import _utils
    from .cross_entropy import cross_entropy_kernel

    with _utils.captured_launches((variant.arch // 10, variant.arch % 10)) as launches:
        _call_launcher(variant)
    (launch,) = launches
    with aot_launch.launched_on(variant.arch) as seen:
        launch.kernel[launch.grid](*launch.args, **launch.kwargs)  # type: ignore[index]
    ((_, spec),) = seen
    return cross_entropy_kernel, {k: spec[k] for k in aot_launch.SPEC_KEYS if k in spec}


def compile_one(job: tuple[aot.Variant, int]) -> dict:
    return aot_gated.compile_with(specialization, job)


def run(archs, jobs: int) -> list[dict]:
    return aot_gated.run_family("aot_ce", variants(archs), compile_one, jobs)


def main(argv: list[str] | None = None) -> int:
    return aot_gated.family_main(__doc__ or "", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
