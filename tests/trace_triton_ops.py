"""Trace ``manualbp::triton_linear_*`` the way `torch.compile` does on a GPU, on a machine without one.

Run as a script, in a process WITHOUT ``TRITON_INTERPRET`` (tests/test_triton_op_trace.py starts it):
the interpreter's `wrap_triton` hands back the interpreted kernel, which no tracer can record.

What stands in for the GPU:
* fake CUDA tensors (`FakeTensorMode` makes them without a device);
* `torch.cuda.get_device_capability` / `get_device_properties`, which pick config lists and splits;
* Triton's active driver, asked only for the compile target: Inductor's mutation analysis compiles
  every recorded kernel to TTIR for it (no GPU needed for that), as it does before codegen.

For each case it traces the forward and the backward op through AOTAutograd (functionalization
decomposes a `triton_op` into the launches it records) and prints one JSON line per traced op:
the kernels launched, which of their arguments they write, and the graph's inputs and outputs.
"""

from __future__ import annotations

import json
import os
import sys
import types

import torch

CAPABILITY = [(9, 0)]
torch.cuda.get_device_capability = lambda device=None: CAPABILITY[0]
torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(multi_processor_count=132)

import triton  # noqa: E402
from torch._functorch.aot_autograd import aot_function  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class _CompileTargetOnly:
    """The part of a Triton driver that TTIR generation reads: the target of the faked device."""

    def get_current_target(self) -> GPUTarget:
        major, minor = CAPABILITY[0]
        return GPUTarget("cuda", major * 10 + minor, 32)

    def get_current_device(self) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cuda", 0)


triton.runtime.driver.set_active(_CompileTargetOnly())

from manualbp import ops  # noqa: E402
from manualbp.activations import get_activation  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _kernel_name(kernel: object) -> str:
    while not isinstance(kernel, JITFunction):  # Autotuner(s) around the jitted function
        kernel = kernel.fn  # type: ignore[attr-defined]
    return kernel.fn.__name__


def _describe(gm: torch.fx.GraphModule) -> dict:
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    launches, other_targets = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            tensors = node.kwargs["kwargs"]
            args = {**kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"]), **tensors}
            written = list(node.kwargs["tensors_to_clone"])
            launches.append(
                {
                    "kernel": _kernel_name(kernel),
                    "configs": len(node.kwargs["grid"]),
                    "written": written,
                    "written_sources": [
                        tensors[name].name if isinstance(tensors[name], torch.fx.Node) else None
                        for name in written
                    ],
                    "scalars": {
                        k: type(v).__name__ for k, v in args.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)
                    },
                    "negative_slope": args.get("negative_slope"),
                    "prev_negative_slope": args.get("prev_negative_slope"),
                }
            )
        elif node.target is not getattr:
            other_targets.append(str(node.target))
    outputs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    return {
        "placeholders": placeholders,
        "launches": launches,
        "other_targets": other_targets,
        "outputs": [tuple(o.meta["val"].shape) if o is not None else None for o in outputs],
        "output_dtypes": [str(o.meta["val"].dtype) if o is not None else None for o in outputs],
    }


def trace(case: dict) -> list[dict]:
    CAPABILITY[0] = tuple(case["capability"])
    os.environ["MANUALBP_TRITON_AUTOTUNE"] = "1" if case["autotune"] else "0"
    dtype = DTYPES[case["dtype"]]
    M, K, N = case["shape"]
    act, slope = case["activation"], case["negative_slope"]
    uses_output = get_activation(act).uses_output
    need_input, need_weight, need_bias = case["needs"]
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: object) -> torch.fx.GraphModule:
        graphs.append(gm)
        return gm

    def forward(x, weight, bias):  # noqa: ANN001, ANN202
        return ops._triton_forward(x, weight, bias, act, slope)

    def backward(grad_out, x, weight, saved):  # noqa: ANN001, ANN202
        return ops._triton_backward(
            grad_out, x, weight, saved, act, slope, need_input, need_weight, need_bias
        )

    with FakeTensorMode():
        x = torch.empty(M, K, device="cuda", dtype=dtype)
        weight = torch.empty(N, K, device="cuda", dtype=dtype)
        bias = torch.empty(N, device="cuda", dtype=dtype) if case["bias"] else None
        grad_out = torch.empty(M, N, device="cuda", dtype=dtype)
        out, z = aot_function(forward, fw_compiler=capture)(x, weight, bias)
        saved = out if uses_output else z
        aot_function(backward, fw_compiler=capture)(grad_out, x, weight, saved)
    return [
        {"case": case, "op": op, **_describe(gm)}
        for op, gm in zip(("forward", "backward"), graphs, strict=True)
    ]


def launch_wrapping() -> dict:
    """What `traceable` hands back outside and inside `recorded_launches` (eager launches must
    stay plain: a wrapped one would go through higher-order-op dispatch)."""
    from manualbp.triton_kernels import _utils
    from manualbp.triton_kernels.delta import delta_kernel
    from torch._higher_order_ops.triton_kernel_wrap import TraceableTritonKernelWrapper

    outside = _utils.traceable(delta_kernel)
    with _utils.recorded_launches():
        inside = _utils.traceable(delta_kernel)
    return {
        "outside_is_kernel": outside is delta_kernel,
        "inside_is_wrapper": isinstance(inside, TraceableTritonKernelWrapper),
    }


def main() -> None:
    assert ops._traceable_launchers(), "the triton_op path is off in this process"
    print(json.dumps({"wrapping": launch_wrapping()}), flush=True)
    for line in sys.stdin:
        for record in trace(json.loads(line)):
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
