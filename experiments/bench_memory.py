"""Activation memory of MLPs and of the fused cross-entropy head: manualbp against native PyTorch.

For MLPs of depth 2-8 and every activation it measures, per training step (forward + backward):

* saved bytes — what autograd keeps for backward, counted by distinct storage with
  `torch.autograd.graph.saved_tensors_hooks`, leaving out the parameters and the input (memory
  the caller holds anyway): `manualbp.ops.network.saved_tensor_bytes`;
* peak bytes — the highest memory in use during forward + backward above what was allocated
  before the step: on CPU from the profiler's allocation events, on CUDA from
  `torch.cuda.max_memory_allocated` (both recorded on CUDA);

for four contenders: native (`nn.Linear` + activation modules), manualbp per-layer mode
(`MLP(mode="layers")`), manualbp network mode (`MLP()`, one autograd node), and network mode with
`recompute=True`. A second table compares `linear_cross_entropy` with
`F.cross_entropy(F.linear(...))` for a classifier head with many classes.

Not a test: run it by hand, e.g.

    python experiments/bench_memory.py                 # CPU, writes results/memory_cpu.{md,csv}
    python experiments/bench_memory.py --device cuda   # writes results/memory_cuda.{md,csv}
"""

from __future__ import annotations

import argparse
import csv
import datetime
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import manualbp as mbp
from manualbp.bench.memory import peak_bytes
from manualbp.ops.heads import linear_cross_entropy
from manualbp.ops.network import saved_tensor_bytes

RESULTS = Path(__file__).resolve().parent / "results"
CONTENDERS = ("native", "layers", "network", "recompute")


def _native(model: mbp.MLP) -> nn.Sequential:
    mods: list[nn.Module] = []
    for layer in model.layers:
        lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        lin = lin.to(device=layer.weight.device, dtype=layer.weight.dtype)
        lin.load_state_dict(layer.state_dict())
        mods += [lin, layer.act.native()]
    return nn.Sequential(*mods)


def mlp_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    for activation in mbp.ACTIVATIONS:
        for depth in range(2, 9):
            torch.manual_seed(0)
            sizes = [args.width] * (depth + 1)
            base = mbp.MLP(sizes, activation, device=device)
            models = {
                "native": _native(base),
                "layers": mbp.MLP(sizes, activation, device=device, mode="layers"),
                "network": base,
                "recompute": mbp.MLP(sizes, activation, device=device, recompute=True),
            }
            for name in ("layers", "recompute"):
                models[name].load_state_dict(base.state_dict())
            x = torch.randn(args.rows, args.width, device=device)
            for name, model in models.items():
                params = list(model.parameters())
                saved = saved_tensor_bytes(lambda m=model, x=x: m(x), exclude=[x, *params])

                def step(m=model, x=x) -> None:
                    m(x).square().mean().backward()

                step()  # warm-up: lazy initialisation and caches are not counted
                model.zero_grad(set_to_none=True)
                # .grad tensors allocated during the step are part of every contender's peak.
                peak, cuda_peak = peak_bytes(step, device)
                # Network mode's δ workspace outlives the step (the next one reuses it): what it
                # holds is reported beside the peak, and in a second ratio added to it.
                workspace = getattr(model, "_workspace", None)
                held = workspace.nbytes if workspace is not None else 0
                model.zero_grad(set_to_none=True)
                rows.append(
                    dict(
                        activation=activation, depth=depth, contender=name,
                        saved_tensors=saved.count, saved_bytes=saved.total,
                        peak_bytes=peak, cuda_peak_bytes=cuda_peak, workspace_bytes=held,
                    )
                )  # fmt: skip
    return rows


def head_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    M, K, C = args.head_rows, args.head_in, args.head_classes
    x = torch.randn(M, K, device=device, requires_grad=True)
    w = (torch.randn(C, K, device=device) / K**0.5).requires_grad_()
    b = torch.zeros(C, device=device, requires_grad=True)
    t = torch.randint(0, C, (M,), device=device)
    contenders = {
        "native": lambda: F.cross_entropy(F.linear(x, w, b), t),
        "linear_cross_entropy": lambda: linear_cross_entropy(x, w, b, t),
        "linear_cross_entropy chunk=256": lambda: linear_cross_entropy(x, w, b, t, chunk_size=256),
    }
    out = []
    for name, fn in contenders.items():
        saved = saved_tensor_bytes(fn, exclude=[x, w, b, t])
        fn().backward()
        for p in (x, w, b):
            p.grad = None
        peak, cuda_peak = peak_bytes(lambda f=fn: f().backward(), device)
        for p in (x, w, b):
            p.grad = None
        out.append(
            dict(contender=name, saved_tensors=saved.count, saved_bytes=saved.total,
                 peak_bytes=peak, cuda_peak_bytes=cuda_peak)
        )  # fmt: skip
    return out


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.2f}"


def write(rows: list[dict], head: list[dict], args: argparse.Namespace, device: torch.device):
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"memory_{device.type}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(stem.with_name(stem.name + "_head.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(head[0]))
        writer.writeheader()
        writer.writerows(head)

    by = {(r["activation"], r["depth"], r["contender"]): r for r in rows}
    cuda = device.type == "cuda"
    lines = [
        f"# Activation memory: manualbp vs native ({device.type})",
        "",
        f"Command: `{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}`  ",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}  ",
        f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if cuda else ""),
        "",
        f"MLP: rows M = {args.rows}, every width {args.width}, float32, output activation identity,"
        " loss = mean(out²). *saved* = bytes autograd keeps for backward (distinct storages,"
        " parameters and input excluded, measured with saved_tensors_hooks); *peak* = highest"
        " memory above the start during forward + backward (profiler allocation events"
        + ("; CUDA: torch.cuda.max_memory_allocated" if cuda else "")
        + "), gradients included. MiB. Ratios are manualbp network mode ÷ native. *workspace* ="
        " the buffer network mode keeps across steps (released with the module): each step's"
        " forward writes layer 0's kept tensor into it and backward reuses it for a δ, so it"
        " stands in for an allocation of the step; *peak+ws ratio* adds it to network mode's"
        " peak.",
        "",
        "| activation | depth | saved native | saved layers | saved network | saved recompute"
        " | saved ratio | peak native | peak network | peak recompute | peak ratio | workspace"
        " | peak+ws ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    key = "cuda_peak_bytes" if cuda else "peak_bytes"
    for activation in mbp.ACTIVATIONS:
        for depth in range(2, 9):
            r = {c: by[(activation, depth, c)] for c in CONTENDERS}
            saved_ratio = r["network"]["saved_bytes"] / max(r["native"]["saved_bytes"], 1)
            peak_ratio = r["network"][key] / max(r["native"][key], 1)
            held = r["network"]["workspace_bytes"]
            peak_ws_ratio = (r["network"][key] + held) / max(r["native"][key], 1)
            lines.append(
                f"| {activation} | {depth} | {_mib(r['native']['saved_bytes'])} | "
                f"{_mib(r['layers']['saved_bytes'])} | {_mib(r['network']['saved_bytes'])} | "
                f"{_mib(r['recompute']['saved_bytes'])} | {saved_ratio:.2f} | "
                f"{_mib(r['native'][key])} | {_mib(r['network'][key])} | "
                f"{_mib(r['recompute'][key])} | {peak_ratio:.2f} | "
                f"{_mib(r['network']['workspace_bytes'])} | {peak_ws_ratio:.2f} |"
            )
    lines += [
        "",
        f"## Classifier head: M = {args.head_rows}, in = {args.head_in}, classes = "
        f"{args.head_classes}, float32, reduction mean",
        "",
        f"The logits alone are {_mib(args.head_rows * args.head_classes * 4)} MiB.",
        "",
        "| contender | saved tensors | saved MiB | peak MiB" + (" | CUDA peak MiB |" if cuda else " |"),
        "|---|---:|---:|---:" + ("|---:|" if cuda else "|"),
    ]
    for r in head:
        lines.append(
            f"| {r['contender']} | {r['saved_tensors']} | {_mib(r['saved_bytes'])} | "
            f"{_mib(r['peak_bytes'])} |" + (f" {_mib(r['cuda_peak_bytes'])} |" if cuda else "")
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem.with_suffix(".md")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--head-rows", type=int, default=2048)
    parser.add_argument("--head-in", type=int, default=128)
    parser.add_argument("--head-classes", type=int, default=8192)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = mlp_rows(args, device)
    head = head_rows(args, device)
    print(write(rows, head, args, device))


if __name__ == "__main__":
    main()
