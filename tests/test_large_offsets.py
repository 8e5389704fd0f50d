"""Offsets are 64-bit wherever a product of sizes can pass 2³¹ (DESIGN.md, "Conventions").

A tensor past 2³¹ elements (4 GiB of bfloat16) cannot be built here, so the proof is in the
compiled code: every kernel is compiled ahead of time for sm_90 — in a subprocess WITHOUT
TRITON_INTERPRET, exactly as the launchers specialise it (`manualbp.triton_kernels.aot`) — and its
Triton IR (TTIR) is read:

1. every `tt.addptr` (pointer + offset) takes an i64 offset, or an i32 one that is a plain
   index bounded by a size (a column within a row whose pointer was already advanced in i64, a
   kernel argument as is): never one that went through a product with a run-time stride;
2. no i32 multiplication of two run-time values exists (`row * stride` in 32 bits is the bug);
   i32 products with a constant (`pid * BLOCK_M`) stay below the size they index;
3. the row index is extended to i64 before it is multiplied by a row stride;

and in the LLVM IR every address computation into global memory (`getelementptr` on
`ptr addrspace(1)`) takes an i64 index. A control kernel written the wrong way (i32 row offsets,
and an i32 product cast to i64 afterwards) must be flagged by the same checks, so they can fail.
"""

from __future__ import annotations

import json
import os
import re
import sys
import textwrap

import pytest

from tests.processes import run_bounded

# (kernel, dtype, activation, flags) of `manualbp.triton_kernels.aot.Variant`: every kernel, with
# the flags that give it the most pointers (bias, split partials, a previous layer's saved tensor).
VARIANTS = [
    ("forward", "fp16", "gelu", "bias"),
    ("forward", "fp32", "relu", "nobias"),
    ("grad_input", "bf16", "silu", "prev=gelu"),
    ("grad_input", "fp32", "gelu", "-"),  # a δ prologue (16-bit ones take the δ pass on sm_90)
    ("grad_weight", "fp32", "gelu", "split+bias"),
    ("grad_weight", "bf16", "identity", "bias"),
    ("grad_weight", "fp16", "identity", "bias-only"),
    ("delta", "fp16", "mish", "-"),
    ("split_reduce", "bf16", "-", "-"),
]

CONTROL = '''
import triton
import triton.language as tl


@triton.jit
def row_offsets_i32(x_ptr, out_ptr, M, K, stride_xm, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # i32: the mistake
    offs_k = tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask)
    tl.store(out_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], x, mask=mask)


@triton.jit
def product_then_cast(x_ptr, out_ptr, M, K, stride_xm, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    rows = (offs_m[:, None] * stride_xm).to(tl.int64)  # cast too late: the i32 product wrapped
    x = tl.load(x_ptr + rows + offs_k[None, :], mask=mask)
    tl.store(out_ptr + rows + offs_k[None, :], x, mask=mask)
'''

COMPILE = '''
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from manualbp.triton_kernels import aot, aot_ce
import control

variants, out = json.loads(sys.argv[1]), sys.argv[2]
target = GPUTarget("cuda", 90, 32)
jobs = []
for kernel, dtype, act, flags in variants:
    cfg = aot.configs_for(kernel, act, flags, 90, dtype)[0]
    variant = aot.Variant(kernel, 90, dtype, act, flags, aot._config_name(cfg), kernel in aot.GEMMS)
    name, module = aot._kernel_fn(kernel)
    spec = aot.specialization(variant, 0)  # as the launcher's own launch specialises it
    options = {k: spec[k] for k in aot.SPEC_KEYS[3:] if k in spec}
    src = ASTSource(getattr(module, name), spec["signature"], spec["constants"], spec["configs"][0])
    jobs.append((f"{kernel} {dtype} {act} {flags}", src, options))
# The fused cross-entropy rows kernel (one program per row: row * stride_lm), every option flag
# on, as a launch of its launcher specialises it.
ce = aot.Variant("cross_entropy", 90, "fp32", "-", "grad+all", "w4", False)
ce_fn, ce_spec = aot_ce.specialization(ce, 0)
ce_src = ASTSource(ce_fn, ce_spec["signature"], ce_spec["constants"], ce_spec["configs"][0])
ce_options = {k: ce_spec[k] for k in aot.SPEC_KEYS[3:] if k in ce_spec}
jobs.append(("cross_entropy fp32", ce_src, ce_options))
for name in ("row_offsets_i32", "product_then_cast"):
    sig = {"x_ptr": "*fp16", "out_ptr": "*fp16", "M": "i32", "K": "i32", "stride_xm": "i32",
           "BLOCK_M": "constexpr", "BLOCK_K": "constexpr"}
    src = ASTSource(getattr(control, name), sig, {"BLOCK_M": 64, "BLOCK_K": 64})
    jobs.append((f"control {name}", src, {"num_warps": 4}))
ir = {}
for name, src, options in jobs:
    kernel = triton.compile(src, target=target, options=options)
    ir[name] = {"ttir": kernel.asm["ttir"], "llir": kernel.asm["llir"]}
    print("compiled", name, flush=True)  # progress: the test's timeout is tied to these lines
json.dump(ir, open(out, "w"))
'''


@pytest.fixture(scope="module")
def compiled_ir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """{name: {"ttir": ..., "llir": ...}} of every kernel, compiled for sm_90 in a subprocess."""
    work = tmp_path_factory.mktemp("ir")
    (work / "control.py").write_text(textwrap.dedent(CONTROL))
    (work / "compile.py").write_text(textwrap.dedent(COMPILE))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(work), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = work / "ir.json"
    result = run_bounded(
        [sys.executable, str(work / "compile.py"), json.dumps(VARIANTS), str(out)],
        idle_timeout=900, env=env, cwd=work,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------- TTIR analysis

_DEF = re.compile(r"^\s*(%[\w.#]+)(?::\d+)?\s*=\s*(.*)$")
_TYPE_TAIL = re.compile(r":\s*(.*?)\s*(?:loc\(.*)?$")


def _definitions(ttir: str) -> dict[str, str]:
    """SSA name → the text of the op defining it."""
    defs = {}
    for line in ttir.splitlines():
        m = _DEF.match(line)
        if m:
            defs[m.group(1)] = m.group(2)
    return defs


def _operands(op: str) -> list[str]:
    return re.findall(r"%[\w.#]+", op.split(":")[0])


def _result_type(op: str) -> str:
    """The last type in the op's trailing type list (the offset's for tt.addptr, the target's
    for a cast `i32 to i64`)."""
    m = _TYPE_TAIL.search(op)
    assert m, op
    types = m.group(1)
    return types.split("->")[-1].split(" to ")[-1].split(", ")[-1].strip()


def _is_i32(type_: str) -> bool:
    return type_ == "i32" or type_.endswith("xi32>")


def _is_i64(type_: str) -> bool:
    return type_ == "i64" or type_.endswith("xi64>")


def _constant(name: str, defs: dict[str, str]) -> bool:
    """An arith.constant, or a splat/broadcast of one."""
    op = defs.get(name, "")
    if op.startswith("arith.constant"):
        return True
    if op.startswith(("tt.splat", "tt.broadcast", "tt.expand_dims")):
        return all(_constant(o, defs) for o in _operands(op))
    return False


_INDEX_OPS = (
    "tt.make_range", "tt.get_program_id", "tt.splat", "tt.broadcast", "tt.expand_dims",
    "arith.addi", "arith.subi", "arith.divsi", "arith.remsi", "arith.minsi", "arith.maxsi",
)  # fmt: skip


def _index_like(name: str, defs: dict[str, str], seen: set[str] | None = None) -> bool:
    """An i32 value bounded by a size: built from ranges, program ids, kernel arguments, loop
    counters and constants by additions, splats and products with constants only — never by a
    product with a run-time value (a stride) or anything else (a load, a truncation)."""
    seen = set() if seen is None else seen
    if name in seen or name not in defs:  # a kernel argument or a loop counter
        return True
    seen.add(name)
    op = defs[name]
    if op.startswith("arith.constant"):
        return True
    if op.startswith("arith.muli"):
        operands = _operands(op)
        return any(_constant(o, defs) for o in operands) and all(_index_like(o, defs, seen) for o in operands)
    return op.startswith(_INDEX_OPS) and all(_index_like(o, defs, seen) for o in _operands(op))


def offset_violations(ttir: str) -> list[str]:
    """Checks 1 and 2 of the module docstring; returns the offending ops (empty: clean)."""
    defs = _definitions(ttir)
    bad = []
    for name, op in defs.items():
        if op.startswith("tt.addptr"):
            offset = _operands(op)[1]
            if _is_i32(_result_type(op)) and not _index_like(offset, defs):
                bad.append(f"i32 offset: {name} = {op}")
        if op.startswith("arith.muli") and _is_i32(_result_type(op)):
            if not any(_constant(o, defs) for o in _operands(op)):
                bad.append(f"i32 product of run-time values: {name} = {op}")
    return bad


def row_index_is_i64(ttir: str) -> bool:
    """Check 3: some i64 multiply takes an operand derived from a sign-extended index (the row
    range of a tile, or a program's row id)."""
    defs = _definitions(ttir)
    widened = {n for n, op in defs.items() if op.startswith("arith.extsi") and _is_i64(_result_type(op))}
    for name, op in defs.items():  # SSA order: definitions precede uses
        if op.startswith(("tt.expand_dims", "tt.broadcast", "arith.addi")) and set(_operands(op)) & widened:
            widened.add(name)
    return any(
        op.startswith("arith.muli") and _is_i64(_result_type(op)) and set(_operands(op)) & widened
        for op in defs.values()
    )


def global_gep_indices(llir: str) -> set[str]:
    """The index types of every getelementptr into global memory (addrspace 1)."""
    return set(re.findall(r"getelementptr (?:inbounds )?[^,]+, ptr addrspace\(1\) %[\w.]+, (i\d+)", llir))


# ------------------------------------------------------------------------------- tests

KERNELS = [" ".join(v) for v in VARIANTS] + ["cross_entropy fp32"]


@pytest.mark.aot
@pytest.mark.parametrize("name", KERNELS)
def test_kernel_offsets_are_64_bit(name: str, compiled_ir: dict[str, dict[str, str]]) -> None:
    ir = compiled_ir[name]
    assert "tt.store" in ir["ttir"], "the kernel compiled to nothing"
    assert offset_violations(ir["ttir"]) == []
    assert row_index_is_i64(ir["ttir"]), "no i64 multiply of a widened row index"
    indices = global_gep_indices(ir["llir"])
    assert indices == {"i64"}, f"global address indices: {indices}"


@pytest.mark.aot
@pytest.mark.parametrize("control", ["row_offsets_i32", "product_then_cast"])
def test_checks_flag_32_bit_offsets(control: str, compiled_ir: dict[str, dict[str, str]]) -> None:
    """The same checks on kernels written the wrong way: they must find the mistakes."""
    ttir = compiled_ir[f"control {control}"]["ttir"]
    violations = offset_violations(ttir)
    assert any("i32 product of run-time values" in v for v in violations), violations
    if control == "row_offsets_i32":
        assert any("i32 offset" in v for v in violations), violations
        assert not row_index_is_i64(ttir)
