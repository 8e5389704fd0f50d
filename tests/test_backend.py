"""Backend selection: names, env var, context-local overrides, and no silent fallback."""

import os
import subprocess
import sys
import threading

import pytest
import torch

import manualbp as mbp
from manualbp import backends
from manualbp.backends import reference
from tests.processes import run_bounded


def test_default_and_set_backend():
    assert mbp.get_backend() in mbp.BACKENDS
    previous = mbp.get_backend()
    try:
        mbp.set_backend("torch")
        assert mbp.get_backend() == "torch"
        assert backends.resolve(torch.device("cpu")) is reference
    finally:
        mbp.set_backend(previous)


def test_auto_uses_reference_for_cpu_tensors():
    with mbp.use_backend("auto"):
        assert backends.resolve(torch.device("cpu")) is reference


def test_use_backend_is_scoped_and_nested():
    outer = mbp.get_backend()
    with mbp.use_backend("torch"):
        assert mbp.get_backend() == "torch"
        with mbp.use_backend("auto"):
            assert mbp.get_backend() == "auto"
        assert mbp.get_backend() == "torch"
    assert mbp.get_backend() == outer


def test_use_backend_is_thread_local():
    seen = {}
    entered, release = threading.Event(), threading.Event()

    def worker():
        with mbp.use_backend("torch"):
            entered.set()
            release.wait(5)
            seen["worker"] = mbp.get_backend()

    thread = threading.Thread(target=worker)
    with mbp.use_backend("auto"):
        thread.start()
        entered.wait(5)
        seen["main"] = mbp.get_backend()
        release.set()
        thread.join(5)
    assert seen == {"main": "auto", "worker": "torch"}


@pytest.mark.parametrize("bad", ["cuda", "", None, 3])
def test_unknown_backend_name(bad):
    with pytest.raises(ValueError, match="backend: expected one of auto, torch, triton"):
        mbp.set_backend(bad)
    with pytest.raises(ValueError, match="backend: expected one of"):
        with mbp.use_backend(bad):
            pass


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MANUALBP_BACKEND")}
    return run_bounded([sys.executable, "-c", code], env={**clean, **env}, idle_timeout=600)


def test_env_var_selects_backend():
    result = _run("import manualbp; print(manualbp.get_backend())", MANUALBP_BACKEND="torch")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch"
    bad = _run("import manualbp", MANUALBP_BACKEND="fast")
    assert bad.returncode != 0 and "MANUALBP_BACKEND" in bad.stderr and "'fast'" in bad.stderr


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = (
        "import torch, manualbp\n"
        "x, w = torch.randn(2, 3), torch.randn(4, 3)\n"
        "with manualbp.use_backend('triton'):\n"
        "    manualbp.functional.linear(x, w)\n"
    )
    result = _run(code)
    assert result.returncode != 0
    assert "RuntimeError: backend 'triton' cannot run on device cpu" in result.stderr
