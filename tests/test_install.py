"""The kernels folder installs under manualbp's namespace, never as the top-level `triton_kernels`."""

import os
import sys
from pathlib import Path

from tests.processes import run_bounded

REPO = Path(__file__).resolve().parents[1]


def test_triton_kernels_import_path():
    # Run from outside the repository, so only the installed mapping can resolve the name.
    code = (
        "import importlib.util, manualbp.triton_kernels as k;"
        "print(k.__name__);"
        "print(importlib.util.find_spec('triton_kernels') is None or "
        "'manualbp' not in (importlib.util.find_spec('triton_kernels').origin or ''))"
    )
    result = run_bounded(
        [sys.executable, "-c", code],
        cwd="/",
        idle_timeout=600,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert result.returncode == 0, result.stderr
    name, no_top_level_shadow = result.stdout.split()
    assert name == "manualbp.triton_kernels"
    assert no_top_level_shadow == "True"


def test_package_imports_without_triton():
    # macOS users have no triton: manualbp and its reference backend must still work.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, manualbp\n"
        "x = torch.randn(3, 2, requires_grad=True)\n"
        "manualbp.MLP([2, 4, 1])(x).sum().backward()\n"
        "print(x.grad.shape)\n"
    )
    result = run_bounded([sys.executable, "-c", code], idle_timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch.Size([3, 2])"
