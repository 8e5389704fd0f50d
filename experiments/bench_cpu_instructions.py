"""Instructions per MLP train step (or `LinearAct` fwd+bwd), native against manualbp, by callgrind.

On a shared machine CPU time scatters by ±10 % between two identical native models (an A/A
pair), more than the per-call overheads this compares. Instruction counts do not scatter: run
under valgrind's callgrind, each contender's steps lie between two calls of `functools.reduce`
on an empty sequence (marks), and `--dump-before=functools_reduce` writes the count since the
previous mark to a file of its own. Instructions are not time — page faults, cache misses and
the GEMMs' instruction mix count differently — so this complements the interleaved CPU timing of
`python -m manualbp.bench --device cpu`, for the
fixed per-call cost (small cells), where the two differ least.

    valgrind --tool=callgrind --dump-before=functools_reduce \\
        --callgrind-out-file=/tmp/cg.%p.out \\
        python experiments/bench_cpu_instructions.py 30 64x64x2xrelu L64x64x64xgelu
    python experiments/bench_cpu_instructions.py --report /tmp/cg.<pid>.out 30 64x64x2xrelu L64x64x64xgelu

A cell is BATCHxWIDTHxDEPTHxACT (MLP train step: zero_grad, forward, MSE loss, backward, SGD)
or LBATCHxINxOUTxACT (`LinearAct` forward + backward of a sum). Other manualbp versions can be
added as contenders with `--package NAME=IMPORT_NAME` (a copy of the package under another name
on the path).
"""

from __future__ import annotations

import argparse
import functools
import importlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import manualbp as mbp


def _mark() -> None:
    functools.reduce(lambda a, b: a, (), None)


def _contender(cell: str, package: object | None) -> Callable[[], None]:
    layer = cell.startswith("L")
    batch, width, depth, act = cell.lstrip("L").split("x")
    b, w, d = int(batch), int(width), int(depth)
    torch.manual_seed(0)
    if layer:
        model: nn.Module = (
            nn.Sequential(nn.Linear(w, d), mbp.get_activation(act).native())
            if package is None
            else package.LinearAct(w, d, act)  # type: ignore[attr-defined]
        )
        x = torch.randn(b, w, requires_grad=True)

        def layer_step() -> None:
            model(x).sum().backward()

        return layer_step
    if package is None:
        mods: list[nn.Module] = []
        for i in range(d):
            mods.append(nn.Linear(w, w))
            if i < d - 1:
                mods.append(mbp.get_activation(act).native())
        model = nn.Sequential(*mods)
    else:
        model = package.MLP([w] * (d + 1), act)  # type: ignore[attr-defined]
    x, target = torch.randn(b, w), torch.randn(b, w)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("steps", type=int)
    p.add_argument("cells", nargs="+")
    p.add_argument("--package", action="append", default=[], help="NAME=IMPORT_NAME")
    p.add_argument("--report", type=Path, help="callgrind output base name: print the table")
    args = p.parse_args()
    names = ["native", "manualbp", *(s.split("=")[0] for s in args.package)]
    if args.report is not None:
        counts = []
        for i in range(2, 2 + len(names) * len(args.cells)):
            text = Path(f"{args.report}.{i}").read_text()
            counts.append(int(next(ln for ln in text.splitlines() if ln.startswith("summary:")).split()[1]))
        print("| cell | " + " | ".join(f"{n} instr/step" for n in names) + " | "
              + " | ".join(f"{n} ÷ native" for n in names[1:]) + " |")  # fmt: skip
        print("|---" * (2 * len(names)) + "|")
        for c, cell in enumerate(args.cells):
            row = [n / args.steps for n in counts[c * len(names) : (c + 1) * len(names)]]
            print(f"| {cell} | " + " | ".join(f"{n / 1e6:.3f} M" for n in row) + " | "
                  + " | ".join(f"{n / row[0]:.3f}" for n in row[1:]) + " |")  # fmt: skip
        return
    torch.set_num_threads(1)
    packages: list[object | None] = [None, mbp]
    packages += [importlib.import_module(s.split("=")[1]) for s in args.package]
    steps = [_contender(cell, package) for cell in args.cells for package in packages]
    for step in steps:  # warm-up: plans, workspace, allocator
        for _ in range(5):
            step()
    _mark()
    for step in steps:
        for _ in range(args.steps):
            step()
        _mark()


if __name__ == "__main__":
    main()
