"""What the AOT build reads in compiled code: shared-memory rings in the TTGIR, the main loop
of the SASS, and a cost model on top of them (GPU_AUDIT.md §1-3): text analysis of the records
and files any Triton version writes (`aot.py` uses it; the model asks `choose_split`), and
`cubin_record`, the fields every AOT record (`aot`, `aot_gated`, `aot_ce`, `aot_fused`) reads off
a compiled kernel with the Triton wheel's cuobjdump.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

_SSA = re.compile(r"%[\w.#]+")
_COPY_OPS = ("ttg.async_copy_global_to_local", "ttng.async_tma_copy_global_to_local")


def _results_and_operands(line: str) -> tuple[list[str], list[str]]:
    head, eq, rest = line.partition(" = ")
    if not eq:
        return [], _SSA.findall(line)
    results = [r.split(":")[0] for r in _SSA.findall(head)]
    return results, _SSA.findall(rest.split(" loc(")[0])


def _loop_spans(lines: list[str]) -> list[tuple[int, int]]:
    """(first, last) line of every scf.for region (brace-balanced; attributes stay on a line)."""
    spans = []
    for start, line in enumerate(lines):
        if "scf.for" not in line.split(" loc(")[0]:
            continue
        depth = 0
        for end in range(start, len(lines)):
            depth += lines[end].count("{") - lines[end].count("}")
            if depth <= 0 and end > start:
                spans.append((start, end))
                break
    return spans


def ring_report(ttgir: str) -> list[dict]:
    """Every multi-slot shared-memory ring that asynchronous copies fill, with how many slots
    its pipeline needs (GPU_AUDIT.md finding A).

    A ring is a `ttg.local_alloc : () -> !ttg.memdesc<S x …>` that async copies (cp.async or
    TMA) write. `ahead` = the copies into it issued before its loop (the steps in flight when
    the loop starts: iteration t copies step t + ahead). The loop body is then walked in order,
    twice (steady state), tracking the wgmma groups still pending (`isAsync` dots push a group;
    `warp_group_dot_wait {pendings = P}` keeps the newest P; a synchronous dot retires all).
    At each copy into the ring in iteration t the slots in use are the `ahead` steps t+1 … t+ahead
    (the new one included) plus every step ≤ t that a pending wgmma group still reads from the
    ring (`async_readers`: the async wgmma ops of the body reading it). `needed` is the most
    slots in use at any copy; `slots < needed` is a race (the copy
    overwrites a tile a wgmma may still read: undefined behaviour in PTX). Synchronous readers
    (`local_load` into registers for mma.sync or a register-A wgmma) are ordered by program
    order, which the pipeliner keeps before the copy into their slot.
    """
    lines = ttgir.splitlines()
    rings: dict[str, dict] = {}
    alloc = re.compile(
        r"(%[\w.#]+) = ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x(\d+)x([\dx]*)(\w+?),"
    )
    for n, line in enumerate(lines):
        m = alloc.search(line)
        # An i64 array is the mbarriers of a TMA pipeline, which every TMA copy names as an
        # operand (its completion barrier): not an operand ring.
        if m and m[5] != "i64":
            rings[m[1]] = {"ring": m[1], "slots": int(m[2]), "line": n, "views": {m[1]}}
    # Views of each ring (memdesc_index / _trans / _subslice / _reinterpret …), to a fixed point.
    changed = True
    while changed:
        changed = False
        for line in lines:
            results, operands = _results_and_operands(line)
            if not results or not line.split(" = ", 1)[1].lstrip().startswith("ttg.memdesc_"):
                continue  # only view ops (memdesc_index, _trans, _subslice, _reinterpret) alias
            for ring in rings.values():
                if any(o in ring["views"] for o in operands) and not set(results) <= ring["views"]:
                    ring["views"] |= set(results)
                    changed = True

    def ring_of(names) -> set[str]:
        return {r for r, ring in rings.items() if any(x in ring["views"] for x in names)}

    def is_copy(line: str) -> bool:
        return any(op in line for op in _COPY_OPS)

    def copy_target(line: str) -> set[str]:
        _, operands = _results_and_operands(line)
        return ring_of(operands[1:2]) if "ttg.async_copy" in line else ring_of(operands)

    spans = _loop_spans(lines)
    out = []
    for name, ring in rings.items():
        copies = [n for n, line in enumerate(lines) if is_copy(line) and name in copy_target(line)]
        if not copies:
            continue  # not a pipelined operand ring (epilogue staging, barriers)
        loops = [sp for sp in spans if any(sp[0] < c < sp[1] for c in copies)]
        if not loops:
            continue
        first, last = min(loops, key=lambda sp: sp[1] - sp[0])  # the innermost loop with copies
        ahead = sum(1 for c in copies if ring["line"] < c < first and not any(
            sp[0] < c < sp[1] for sp in spans if sp != (first, last) and sp[0] > ring["line"]))
        body = lines[first + 1 : last]
        pending: list[tuple[int, set[str]]] = []  # (iteration, rings read) of pending groups
        needed = 0
        readers = sum(
            1 for line in body
            if "ttng.warp_group_dot " in line and "isAsync = true" in line
            and name in ring_of(_results_and_operands(line.split(" loc(")[0])[1][:2])
        )  # fmt: skip
        for it in (0, 1):
            for line in body:
                code = line.split(" loc(")[0]
                _, operands = _results_and_operands(code)
                if "ttng.warp_group_dot_wait" in code:
                    p = int(re.search(r"pendings = (\d+)", code)[1])
                    pending = pending[len(pending) - p :] if p else []
                elif "ttng.warp_group_dot " in code:
                    if "isAsync = true" in code:
                        pending.append((it, ring_of(operands[:2])))
                    else:
                        pending = []
                elif is_copy(code) and name in copy_target(code) and it == 1:
                    steps = {i for i, reads in pending if name in reads}
                    needed = max(needed, ahead + len(steps))
        out.append(
            {"ring": name, "slots": ring["slots"], "ahead": ahead, "needed": needed, "async_readers": readers}
        )
    return out


def ring_problems(rings: list[dict]) -> list[str]:
    return [
        f"shared-memory ring {r['ring']}: {r['slots']} slots, {r['needed']} needed "
        f"({r['ahead']} loads ahead + steps still read by async wgmma): a copy overwrites a tile in use"
        for r in rings
        if r["slots"] < r["needed"]
    ]


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")


def _sass_loops(sass: str) -> tuple[list[tuple[int, str]], list[tuple[int, int]]]:
    """(address, instruction) of every SASS line, and (first, last) address of every backward
    branch's loop."""
    insts = [(int(m[1], 16), m[2].strip()) for m in _SASS_LINE.finditer(sass)]
    loops = []
    for addr, text in insts:
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if m and int(m[1], 16) < addr:
            loops.append((int(m[1], 16), addr))
    return insts, loops


def _serialized(body: list[str]) -> bool:
    return any(re.search(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x0\b", t) for t in body)


def sass_mma_loops(sass: str) -> list[dict]:
    """Every innermost loop (no loop inside it) with tensor-core instructions, in address
    order: its HGMMA and HMMA counts and whether it waits for every wgmma group each step. A
    kernel with several K-loops (the fused weight gradient: one per layer) has one entry each,
    where `sass_main_loop` names the smallest only."""
    insts, loops = _sass_loops(sass)
    out = []
    for lo, hi in sorted(loops):
        if any((lo, hi) != (a, b) and lo <= a and b <= hi for a, b in loops):
            continue
        body = [t for a, t in insts if lo <= a <= hi]
        hgmma = sum(1 for t in body if re.search(r"\bHGMMA\b", t))
        hmma = sum(1 for t in body if re.search(r"\bHMMA\b", t))
        if hgmma or hmma:
            out.append({"hgmma": hgmma, "hmma": hmma, "serialized": _serialized(body)})
    return out


def sass_main_loop(sass: str) -> dict:
    """The main loop of a kernel's SASS: the innermost backward branch whose body holds tensor
    core instructions (HGMMA, else HMMA), i.e. one K-step. Instruction, HGMMA and BAR counts;
    `serialized`: a `WARPGROUP.DEPBAR.LE gsb0, 0x0` (wait for every wgmma group) inside it."""
    insts, loops = _sass_loops(sass)
    best = None
    for lo, hi in loops:
        body = [t for a, t in insts if lo <= a <= hi]
        mma = sum(1 for t in body if re.search(r"\bH(?:G)?MMA\b", t))
        if mma and (best is None or hi - lo < best[1] - best[0]):
            best = (lo, hi, body)
    if best is None:
        return {
            "loop_insts": None, "loop_wg_macs": 0, "loop_hgmma": 0, "loop_bars": 0, "wgmma_serialized": False,
        }  # fmt: skip
    body = best[2]
    shapes = [re.search(r"\bHGMMA\.(\d+)x(\d+)x(\d+)", t) for t in body]
    return {
        "loop_insts": len(body),
        "loop_wg_macs": sum(int(m[1]) * int(m[2]) * int(m[3]) for m in shapes if m),
        "loop_hgmma": sum(1 for t in body if re.search(r"\bHGMMA\b", t)),
        "loop_bars": sum(1 for t in body if re.search(r"\bBAR\.(?:SYNC|ARV|RED)", t)),
        "wgmma_serialized": _serialized(body),
    }


# The cost model's machine (H100/H200 SXM, sm_90) and baselines; GPU_AUDIT.md §3.
SMS = 132
TENSOR_FMA_PER_CLK = 2048  # dense 16-bit wgmma FMAs per clock per SM (989 TFLOP/s at 1.83 GHz)
ISSUE_PER_CLK = 4  # one warp instruction per clock per scheduler, 4 schedulers per SM
PEAK_FLOPS = 790e12  # 16-bit dense, measured class of an H200
BANDWIDTH = 4.8e12  # bytes/s of HBM
REGS_PER_SM, SMEM_PER_SM = 65536, 228 * 1024
BAR_CLK = 40  # issue clocks lost per CTA-wide barrier beyond the pipeline's own 2
FILL_CLK = 1500  # pipeline fill and drain per output tile
BASE = {"cp.async": 0.85, "tma_persistent": 0.92}
CUBLAS_EFFICIENCY = 0.905  # 715 of 790 TFLOP/s: the modelled cuBLAS-class GEMM
SHAPES = ((8192, 4096, 4096), (8192, 1024, 1024))  # (M, N, K): rows, out_features, in_features


def _choose_split(M: int, N: int, K: int) -> int:
    """The launcher's split of M on a 132-SM device."""
    from unittest import mock

    import torch

    from . import _utils, linear_grad_weight

    with mock.patch.object(_utils, "num_sms", lambda device: SMS):
        return linear_grad_weight.choose_split(M, N, K, torch.device("cuda"))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _ctas_per_sm(regs: int, warps: int, shared: int) -> int:
    per_warp = -(-regs * 32 // 256) * 256  # registers are allocated per warp in units of 256
    return max(0, min(REGS_PER_SM // (per_warp * warps), SMEM_PER_SM // (shared + 1024), 64 // warps))


def cost_model(record: dict) -> dict | None:
    """Modelled fraction of a cuBLAS-class GEMM for a 16-bit sm_90 GEMM record, from its SASS.

    Per K-step of one CTA: tensor clk = warpgroups × Σ (m·n·k of the loop's HGMMAs) / 2048;
    issue clk = warps × loop instructions / 4 + 40 per BAR beyond 2. Occupancy from registers
    (per-warp units of 256), shared memory (+1 KiB reserved per CTA) and 64 warps per SM.
    η_loop = min(base, tensor / issue), at most tensor / (tensor + issue) if serialised; base
    0.85 for the cp.async, depth-1 wgmma loop, 0.92 for the TMA persistent one (`persistent`:
    USE_TMA, which the launchers always launch persistent): operand tiles by TMA, so no
    per-K-step address arithmetic, masks or per-thread copies (its smaller `loop_insts` counts
    in issue clk too), the class of published tensor-descriptor persistent Triton GEMMs.
    η_pe = main / (main + (1500 + epilogue issue clk) × (1 − overlap)); overlap 0 at 1 CTA/SM,
    0.5 at 2+ (persistent launches run 2 programs per SM, `_utils.persistent_programs`: the
    other program's main loop covers one's epilogue; the tile loop is not flattened, so the
    next tile's loads do not start under a program's own epilogue and the fill stays per
    tile); epilogue issue = warps × (SASS outside the loop) / 4.
    η_wave = tiles / (132 · ⌈tiles / 132⌉), persistent or not (a persistent program runs
    ⌈tiles / programs⌉ or one fewer tiles: the same last partial round).
    Time = max(FLOP / (790 TFLOP/s · η_loop · η_pe · η_wave), compulsory bytes / 4.8 TB/s),
    against cuBLAS at 715 TFLOP/s (η = 0.905) on the same bytes. grad_weight is split over M
    as `choose_split` does on 132 SMs (its fp32 partials, and the bias programs' reads of δ,
    counted as bytes).
    ±10 % on the bases (GPU_AUDIT.md §3).
    """
    if not (sixteen_bit_sm90_gemm(record) and record["loop_wg_macs"]):
        return None
    m = re.match(r"(\d+)x(\d+)x(\d+) w(\d+) s(\d+)", record["config"])
    bm, bn, bk, warps = (int(m[i]) for i in range(1, 5))
    persistent = bool(record.get("persistent")) and record["tma"]
    base = BASE["tma_persistent" if persistent else "cp.async"]
    tensor = warps // 4 * record["loop_wg_macs"] / TENSOR_FMA_PER_CLK
    issue = warps * record["loop_insts"] / ISSUE_PER_CLK + BAR_CLK * max(0, record["loop_bars"] - 2)
    ctas = _ctas_per_sm(record["regs"], warps, record["shared"])
    eta_loop = min(base, tensor / issue)
    if record["wgmma_serialized"]:  # the MMAs no longer overlap the issue of the rest
        eta_loop = min(eta_loop, tensor / (tensor + issue))
    epilogue = warps * (record["sass_insts"] - record["loop_insts"]) / ISSUE_PER_CLK
    overlap = 0.5 if ctas >= 2 else 0.0
    out = {
        "tensor_clk": round(tensor), "issue_clk": round(issue), "ctas_per_sm": ctas,
        "eta_loop": round(eta_loop, 3), "shapes": {},
    }  # fmt: skip
    from .activations import ACTIVATION_IDS, uses_output

    stores_z = record["kernel"] == "forward" and not uses_output(ACTIVATION_IDS[record["act"]])
    for M, N, K in SHAPES:
        flops = 2 * M * N * K
        esize = 2
        split, extra = 1, 0
        if record["kernel"] == "forward":  # out (M, N), reduction over K in BLOCK_K steps
            tiles, steps = _cdiv(M, bm) * _cdiv(N, bn), _cdiv(K, bk)
            compulsory = (M * K + N * K + M * N * (2 if stores_z else 1)) * esize
        elif record["kernel"] == "grad_input":  # out (M, K), reduction over N
            tiles, steps = _cdiv(M, bm) * _cdiv(K, bk), _cdiv(N, bn)
            compulsory = (M * N + N * K + M * K) * esize
        else:  # grad_weight: out (N, K), reduction over M, split as choose_split on 132 SMs
            split = _choose_split(M, N, K)
            rows = _cdiv(_cdiv(M, split), 64) * 64
            split = _cdiv(M, rows)
            tiles, steps = _cdiv(N, bn) * _cdiv(K, bk) * split, _cdiv(rows, bm)
            compulsory = (M * N + M * K + N * K) * esize
            extra = 2 * split * N * K * 4 if split > 1 else 0
            if record["flags"].endswith("bias") and not record["flags"].endswith("nobias"):
                extra += M * N * esize  # the bias programs read δ once more (not in the wave count)
        main = steps * tensor / eta_loop
        eta_pe = main / (main + (FILL_CLK + epilogue) * (1 - overlap))
        eta_wave = tiles / (SMS * _cdiv(tiles, SMS))  # a CTA alone on an SM gets all of it
        ours = max(flops / (PEAK_FLOPS * eta_loop * eta_pe * eta_wave), (compulsory + extra) / BANDWIDTH)
        cublas = max(flops / (PEAK_FLOPS * CUBLAS_EFFICIENCY), compulsory / BANDWIDTH)
        out["shapes"][f"{M}x{N}x{K}"] = {
            "split": split, "ctas": tiles, "eta_pe": round(eta_pe, 3), "eta_wave": round(eta_wave, 3),
            "fraction": round(cublas / ours, 3),
        }  # fmt: skip
    return out


def sixteen_bit_sm90_gemm(record: dict) -> bool:
    """A 16-bit sm_90 GEMM with a dot: the records the wgmma checks apply to."""
    with_dot = record["gemm"] and record["flags"] != "bias-only"
    return with_dot and record["arch"] == 90 and record["dtype"] != "fp32"


def model_table(records: list[dict]) -> str:
    """Markdown table of the cost model of every record that has one (`cost_model`)."""
    names = [f"{M}x{N}x{K}" for M, N, K in SHAPES]
    head = ["kernel", "dtype", "act", "flags", "config", "regs", "CTA/SM", "SASS/step", "HGMMA/step",
            "issue clk", "tensor clk", "η_loop"]  # fmt: skip
    for n in names:
        head += [f"split {n}", f"η_wave {n}", f"fraction {n}"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in records:
        m = r.get("model")
        if not m:
            continue
        row = [r["kernel"], r["dtype"], r["act"], r["flags"], r["config"], r["regs"], m["ctas_per_sm"],
               r["loop_insts"], r["loop_hgmma"], m["issue_clk"], m["tensor_clk"], m["eta_loop"]]  # fmt: skip
        for n in names:
            row += [m["shapes"][n]["split"], m["shapes"][n]["eta_wave"], m["shapes"][n]["fraction"]]
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines)


def cuobjdump_path() -> str:
    """The cuobjdump shipped in the Triton wheel (`triton/backends/nvidia/bin/`)."""
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def cubin_record(kernel) -> tuple[dict, str]:
    """(fields, SASS) of a `triton.compile`d kernel: shared memory, the resource line (regs, stack,
    static shared, local), spill instructions, HGMMA / any MMA / TMA loads, the main-loop counts
    of `sass_main_loop`, the SASS size and the TTGIR rings of `ring_report`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        # One call for both (a process per variant less): the resource line, then the SASS.
        cmd = [cuobjdump_path(), "-res-usage", "-sass", f.name]
        sass = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", sass)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output: {sass[:2000]!r}")
    fields = dict(
        shared=int(kernel.metadata.shared),
        regs=int(m[1]), stack=int(m[2]), static_shared=int(m[3]), local=int(m[4]),
        spill_insts=len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        hgmma="HGMMA" in sass,
        mma=bool(re.search(r"\b(?:HGMMA|HMMA)\b", sass)),
        tma="UTMALDG" in sass,
    )  # fmt: skip
    fields.update(sass_main_loop(sass))
    fields["sass_insts"] = len(_SASS_LINE.findall(sass))
    fields["rings"] = ring_report(kernel.asm["ttgir"])
    return fields, sass
