"""`python -m manualbp info`: versions, and which backends can run on this machine.

    $ python -m manualbp info          # human-readable
    $ python -m manualbp info --json   # one JSON object, for scripts and bug reports
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["collect_info", "main"]


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_devices() -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append(
            {
                "index": index,
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
            }
        )
    return devices


def _backend_rows(devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (backend, device) pair: can it run, and why not."""
    from manualbp.backends import triton_status

    rows = [{"backend": "torch", "device": "cpu", "ok": True, "why": "plain PyTorch"}]
    if devices:
        rows.append({"backend": "torch", "device": "cuda", "ok": True, "why": "plain PyTorch"})
        ok, why = triton_status(torch.device("cuda", 0))
        rows.append({"backend": "triton", "device": "cuda", "ok": ok, "why": why or "kernels"})
    ok, why = triton_status(torch.device("cpu"))
    interpreter = why or "Triton interpreter (TRITON_INTERPRET=1)"
    rows.append({"backend": "triton", "device": "cpu", "ok": ok, "why": interpreter})
    return rows


def collect_info() -> dict[str, Any]:
    """Everything `info` prints, as a dict (also what `--json` dumps)."""
    import manualbp
    from manualbp.backends import get_backend

    devices = _cuda_devices()
    return {
        "manualbp": manualbp.__version__,
        "manualbp_path": os.path.dirname(manualbp.__file__),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "lightning": _version("lightning"),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": devices,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "MANUALBP_BACKEND": os.environ.get("MANUALBP_BACKEND"),
        "backend_in_force": get_backend(),
        "backends": _backend_rows(devices),
    }


def _print_info(info: dict[str, Any]) -> None:
    print(f"manualbp   {info['manualbp']}  ({info['manualbp_path']})")
    print(f"python     {info['python']}  ({info['platform']})")
    print(f"torch      {info['torch']}  (built with CUDA {info['torch_cuda'] or 'none'})")
    for name in ("triton", "lightning"):
        print(f"{name:<10} {info[name] or 'not installed'}")
    if info["cuda_devices"]:
        for d in info["cuda_devices"]:
            print(f"cuda:{d['index']}     {d['name']} (sm_{d['capability']}, {d['memory_gib']} GiB)")
    else:
        print("cuda       no CUDA device")
    print(f"TRITON_INTERPRET={info['TRITON_INTERPRET']}  MANUALBP_BACKEND={info['MANUALBP_BACKEND']}")
    print(f"backend in force: {info['backend_in_force']}")
    print("backends:")
    for row in info["backends"]:
        mark = "yes" if row["ok"] else "no "
        print(f"  {row['backend']:<7} on {row['device']:<5} {mark}  {row['why']}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m manualbp", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, devices and which backends can run here")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.command == "info":
        data = collect_info()
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            _print_info(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
