"""Test-suite setup shared by every test file.

Triton reads TRITON_INTERPRET when `@triton.jit` decorates a kernel, so it must be set before
anything imports triton: here, first thing. On a machine without a GPU the "triton" backend then
runs its kernels on CPU tensors under the interpreter. Set MANUALBP_CUDA_TESTS=1 to run the suite
against real CUDA kernels instead (experiments/gpu_check.sh does).
"""

import os

if os.environ.get("MANUALBP_CUDA_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # One compile per kernel variant instead of one per autotune configuration.
    os.environ.setdefault("MANUALBP_TRITON_AUTOTUNE", "0")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
