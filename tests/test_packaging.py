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
        "manualbp/ops.py",
        "manualbp/convert.py",
        "manualbp/backends/reference.py",
        "manualbp/triton_kernels/__init__.py",
        "manualbp/triton_kernels/_utils.py",
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
