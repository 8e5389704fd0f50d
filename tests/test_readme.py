"""Every Python example in README.md runs as written and prints what the README says it prints.

An example's expected output is the run of full-line comments right after a `print(...)` line;
each such line must appear in the example's stdout, in order. Examples run in a fresh process
(as a user would paste them), in a scratch directory (Lightning writes its logs there).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.processes import run_bounded

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def expected_output(code: str) -> list[str]:
    expected, after_print = [], False
    for line in code.splitlines():
        stripped = line.strip()
        if after_print and stripped.startswith("# "):
            expected.append(stripped[2:].strip())
            continue
        after_print = stripped.startswith("print(")
    return expected


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 4
    assert any("mbp.convert" in b and "torch.compile" in b and "torch.autocast" in b for b in BLOCKS)
    assert "## Using manualbp in an existing model" in README.read_text(encoding="utf-8")


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index: int, tmp_path: Path) -> None:
    code = BLOCKS[index]
    proc = run_bounded([sys.executable, "-c", code], cwd=tmp_path, idle_timeout=900)
    assert proc.returncode == 0, f"README example {index} failed:\n{code}\n{proc.stderr[-3000:]}"
    lines = [line.strip() for line in proc.stdout.splitlines()]
    position = 0
    for want in expected_output(code):
        while position < len(lines) and lines[position] != want:
            position += 1
        assert position < len(lines), f"README example {index}: {want!r} not printed; got\n{proc.stdout}"
        position += 1
