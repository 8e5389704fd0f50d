"""The wheel: builds, installs into a clean venv, and imports from site-packages, not the repo.

The build runs without isolation (no network here: the build requirements are already in the
project's venv). The fresh venv gets torch/triton from the project's venv through a `.pth` path
entry — a plain path, so that venv's editable-install finder for manualbp is *not* activated and
`import manualbp` can only find the installed wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tests.processes import run_bounded

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "manualbp", "triton_kernels")


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = run_bounded(args, cwd=cwd, env=env, idle_timeout=600)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the wheel from a copy of the sources (the shared working tree stays untouched)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        elif path.exists():
            shutil.copy2(path, src / name)
    dist = root / "dist"
    _run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check",
         "--outdir", dist, src, cwd=root)  # fmt: skip
    (built,) = dist.glob("manualbp-*.whl")
    return built


def test_wheel_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "manualbp/__init__.py",
        "manualbp/__main__.py",
        "manualbp/py.typed",
        "manualbp/ops/__init__.py",
        "manualbp/ops/linear_act.py",
        "manualbp/convert.py",
        "manualbp/backends/reference.py",
        "manualbp/triton_kernels/__init__.py",
        "manualbp/triton_kernels/_utils.py",
        "manualbp/lightning/cli.py",
        "manualbp/lightning/configs/digits.yaml",
        "manualbp/lightning/configs/regression.yaml",
        "manualbp/lightning/configs/linear_neuron.yaml",
    ):
        assert required in names, f"{required} missing from {wheel.name}"
    # Installed under manualbp/ only: no top-level triton_kernels (Triton's name), no tests.
    assert not any(n.startswith(("triton_kernels/", "tests/")) for n in names)


def test_wheel_installs_and_imports_in_a_clean_venv(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path)
        .strip()
    )
    torch_site = Path(torch.__file__).resolve().parents[1]
    assert torch_site != site
    (site / "_project_venv.pth").write_text(f"{torch_site}\n")
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
         "--quiet", wheel, cwd=tmp_path)  # fmt: skip

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    probe = (
        "import json, manualbp, manualbp.triton_kernels as tk, manualbp.ops, manualbp.convert;"
        "print(json.dumps([manualbp.__file__, tk.__file__, manualbp.__version__]))"
    )
    package_file, kernels_file, version = json.loads(_run(python, "-c", probe, cwd=tmp_path, env=env))
    installed = site.resolve()
    assert Path(kernels_file).resolve().is_relative_to(installed), kernels_file
    assert Path(package_file).resolve().is_relative_to(installed), package_file
    assert not Path(kernels_file).resolve().is_relative_to(REPO)
    assert (installed / "manualbp" / "py.typed").is_file()
    import manualbp

    assert version == manualbp.__version__

    info = json.loads(_run(python, "-m", "manualbp", "info", "--json", cwd=tmp_path, env=env))
    assert Path(info["manualbp_path"]).resolve().is_relative_to(installed)
    assert info["torch"] == torch.__version__
    assert info["backends"][0] == {"backend": "torch", "device": "cpu", "ok": True, "why": "plain PyTorch"}


def test_info_command_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    from manualbp.__main__ import main

    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"torch      {torch.__version__}" in text
    assert "torch   on cpu   yes" in text
    # conftest sets TRITON_INTERPRET=1 (unless MANUALBP_CUDA_TESTS=1): the interpreter row says yes.
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert "triton  on cpu   yes" in text
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cuda_available"] == torch.cuda.is_available()


def _metadata(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return archive.read(name).decode().splitlines()


def test_wheel_requires_torch_alone_and_names_its_extras(wheel: Path) -> None:
    requires = [line.removeprefix("Requires-Dist: ") for line in _metadata(wheel)
                if line.startswith("Requires-Dist: ")]  # fmt: skip
    unconditional = [r for r in requires if "extra ==" not in r]
    assert [r.split(">")[0].split("=")[0].split(";")[0].strip() for r in unconditional] == ["torch"], requires
    extras = {line.removeprefix("Provides-Extra: ") for line in _metadata(wheel)
              if line.startswith("Provides-Extra: ")}  # fmt: skip
    assert {"triton", "lightning", "bench", "all", "dev"} <= extras
    by_extra: dict[str, set[str]] = {}
    for r in requires:
        if "extra ==" in r:
            name = r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].strip()
            by_extra.setdefault(r.split("extra ==")[1].strip().strip("'\""), set()).add(name)
    assert by_extra["triton"] == {"triton"}
    assert {"lightning", "torchmetrics", "jsonargparse", "scikit-learn"} <= by_extra["lightning"]
    assert {"matplotlib", "rich"} <= by_extra["bench"]
    assert "triton" not in by_extra["lightning"] | by_extra["bench"]


# Run in a fresh venv that holds torch and the wheel, nothing else.
TORCH_ALONE = r"""
import importlib.util, subprocess, sys
missing = [m for m in ("triton", "lightning", "torchmetrics", "sklearn", "matplotlib", "rich", "numpy")
           if importlib.util.find_spec(m) is not None]
assert not missing, f"not a torch-only environment: {missing}"
import torch
import manualbp as mbp
from manualbp.functional import cross_entropy
torch.manual_seed(0)
model = mbp.MLP([8, 16, 3], activation="gelu")
opt = torch.optim.SGD(model.parameters(), lr=0.5)
x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
losses = []
for _ in range(20):
    opt.zero_grad()
    loss = cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    losses.append(loss.item())
assert losses[-1] < 0.9 * losses[0], losses  # 1.120 -> 0.910
print("trained", mbp.get_backend(), f"{losses[0]:.3f}->{losses[-1]:.3f}")
try:
    import manualbp.lightning
except ImportError as err:
    print("lightning:", err)
else:
    raise AssertionError("manualbp.lightning imported without lightning")
try:
    with mbp.use_backend("triton"):
        model(x)
except RuntimeError as err:
    print("triton:", err)
else:
    raise AssertionError("the triton backend ran without triton")
"""


@pytest.mark.slow
def test_wheel_trains_an_mlp_in_a_venv_with_torch_alone(wheel: Path, tmp_path: Path) -> None:
    """The core package needs torch and nothing else; each extra says how to install it."""
    venv = tmp_path / "torch-alone"
    try:
        _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
        python = venv / "bin" / "python"
        pip = (sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-compile")
        # torch from this machine's wheel cache (pinned by constraints.txt: never a CUDA build).
        _run(*pip, "-c", REPO / "constraints.txt", "torch==2.13.0", cwd=tmp_path)
        _run(*pip, "--no-deps", wheel, cwd=tmp_path)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        out = _run(python, "-c", TORCH_ALONE, cwd=tmp_path, env=env)
        assert "trained torch" in out or "trained auto" in out, out
        assert "lightning: manualbp.lightning needs the 'lightning' extra" in out, out
        assert "pip install manualbp[lightning]" in out, out
        assert "the 'triton' package is not installed (pip install manualbp[triton])" in out, out
        # The console scripts: the bench's --help needs torch only; manualbp-train names its extra.
        usage = _run(venv / "bin" / "manualbp-bench", "--help", cwd=tmp_path, env={**env, "COLUMNS": "200"})
        assert usage.startswith("usage: manualbp-bench") and "(default: bench-results)" in usage
        train = run_bounded([venv / "bin" / "manualbp-train", "--help"], cwd=tmp_path, env=env,
                            idle_timeout=600)  # fmt: skip
        assert train.returncode != 0 and "pip install manualbp[lightning]" in train.stderr, train.stderr
    finally:
        shutil.rmtree(venv, ignore_errors=True)
