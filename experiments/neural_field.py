"""Fit a neural field — an RGB image made on the fly — with the fused MLP (`MLP(mode="fused")`).

    python -m experiments.neural_field                                   # CUDA: 256², width 64
    python -m experiments.neural_field --size 16 --steps 30 --width 16   # CPU, under the
                                                   # Triton interpreter (set by --interpreter)

The image is a procedural one (coloured rings around one centre, a soft disc, a diagonal
gradient: smooth and sharp parts alike) of `size` × `size` pixels. Each pixel's coordinates
(x, y) ∈ [−1, 1]² go through a fixed Fourier encoding [x, y, sin(2ᵏπx), cos(2ᵏπx), sin(2ᵏπy),
cos(2ᵏπy)] for k < `--frequencies`, then an MLP [encoding, width × (depth − 1), 3] with a sigmoid
output, trained full batch with Adam on the squared error. Printed: the loss per logged step,
the final PSNR, and with `--compare` the same run in `mode="network"` from the same seed (the
two loss curves agree to rounding).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor


def make_image(size: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(coords (size², 2) in [−1, 1], rgb (size², 3) in [0, 1]): the procedural target."""
    axis = torch.linspace(-1.0, 1.0, size, device=device)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    r = torch.sqrt((x - 0.2) ** 2 + (y + 0.1) ** 2)
    rings = 0.5 + 0.5 * torch.cos(12.0 * r)
    disc = torch.sigmoid((0.45 - torch.sqrt((x + 0.4) ** 2 + (y - 0.35) ** 2)) * 30.0)
    ramp = 0.5 + 0.25 * (x + y)
    rgb = torch.stack([rings * (1 - disc) + disc, ramp, (1 - rings) * 0.8 + 0.2 * disc], dim=-1)
    return torch.stack([x, y], dim=-1).reshape(-1, 2), rgb.clamp(0, 1).reshape(-1, 3)


def encode(coords: Tensor, frequencies: int) -> Tensor:
    """The fixed Fourier features of the coordinates: 2 + 4·frequencies columns."""
    parts = [coords]
    for k in range(frequencies):
        scaled = coords * (math.pi * 2.0**k)
        parts += [torch.sin(scaled), torch.cos(scaled)]
    return torch.cat(parts, dim=-1)


@dataclass
class Fit:
    mode: str
    losses: list[float] = field(default_factory=list)
    psnr: float = float("nan")


def fit(
    size: int = 64,
    steps: int = 200,
    width: int = 64,
    depth: int = 4,
    frequencies: int = 6,
    lr: float = 1e-2,
    mode: str = "fused",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Fit:
    """Train the field; returns the loss of every step and the final PSNR (dB)."""
    import manualbp as mbp

    coords, rgb = make_image(size, device)
    features = encode(coords, frequencies).to(dtype)
    target = rgb.to(dtype)
    torch.manual_seed(seed)
    sizes = [features.shape[1]] + [width] * (depth - 1) + [3]
    model = mbp.MLP(sizes, "relu", "sigmoid", device=device, dtype=dtype, mode=mode)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    result = Fit(mode)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = (model(features).float() - target.float()).square().mean()
        loss.backward()
        optimizer.step()
        result.losses.append(float(loss.detach()))
    with torch.no_grad():
        mse = float((model(features).float() - target.float()).square().mean())
    result.psnr = 10 * math.log10(1.0 / max(mse, 1e-12))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--width", type=int, default=64, help="hidden width (≤ 128 for fused)")
    parser.add_argument("--depth", type=int, default=4, help="layers (1 to 8 for fused)")
    parser.add_argument("--frequencies", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--interpreter", action="store_true", help="run the kernels on CPU (slow)")
    parser.add_argument("--compare", action="store_true", help="also fit with mode='network'")
    args = parser.parse_args(argv)
    if args.interpreter and os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is imported: restart
        os.execv(sys.executable, [sys.executable, "-m", "experiments.neural_field", *(argv or sys.argv[1:])])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    modes = ["fused", "network"] if args.compare else ["fused"]
    for mode in modes:
        run = fit(args.size, args.steps, args.width, args.depth, args.frequencies, args.lr, mode, device,
                  dtype)  # fmt: skip
        every = max(1, args.steps // 10)
        curve = ", ".join(f"{i}: {loss:.4g}" for i, loss in enumerate(run.losses) if i % every == 0)
        print(f"mode={mode}: loss {curve}; final PSNR {run.psnr:.2f} dB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
