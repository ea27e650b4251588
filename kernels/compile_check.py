"""Compile the Triton kernels for a GPU target without a GPU: `python -m lstmd.kernels.compile_check`.

The interpreter accepts what the compiler rejects (tl.dot shapes under 16, some type mixes) and says nothing
about resources. This compiles every kernel and variant, at the launch configurations the launchers use
(`launch_config`; `tiled_config` for the tiled step at its tile, `TILED_STEP`; `_steps_config` for the
per-step sequence), for sm_90 (H100) through Triton's own toolchain (no driver needed), and fails if a compile
fails or a kernel needs more shared memory than one block may have. With cuobjdump (shipped in Triton's NVIDIA
backend) it also prints registers per thread and the stack (spill) bytes, the first thing to look at when tuning
on a real card.

Shapes: H hidden (each H maps to one BLOCK_H, see triton_lstm.launch_config), L layers.
The kernels must be compiled, not interpreted: the module re-runs itself without TRITON_INTERPRET if it is set.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

# sm_90 allows 227 KB of dynamic shared memory per block (232448 bytes; H100 has 228 KB per SM).
SHARED_LIMIT = {90: 232448, 80: 166912}


def _signatures(wt: str) -> dict[str, dict[str, str]]:
    """Triton signatures of the kernels; wt is the weight pointer type ("*fp32" or "*bf16")."""
    f32, i32 = "*fp32", "i32"
    cexpr = {n: "constexpr" for n in ("BLOCK_B", "BLOCK_H", "BLOCK_K", "PREC")}
    step = dict(
        x_ptr=f32, slots_ptr="*i64", reset_ptr="*i8", h_ptr=f32, c_ptr=f32, wx0_ptr=wt, wxr_ptr=wt, wh_ptr=wt,
        bias_ptr=f32, y_ptr=f32, B=i32, IN=i32, S=i32, H=i32, L="constexpr", HAS_RESET="constexpr", **cexpr,
    )  # fmt: skip
    fwd = dict(xw_ptr=f32, wh_ptr=wt, hs_ptr=f32, cs_ptr=f32, gates_ptr=f32, B=i32, T=i32, H=i32, **cexpr)
    bwd = dict(
        dy_ptr=f32, dhn_ptr=f32, dcn_ptr=f32, gates_ptr=f32, cs_ptr=f32, w_ptr=wt, dg_ptr=f32, dh0_ptr=f32,
        dc0_ptr=f32, B=i32, T=i32, H=i32, **cexpr,
    )  # fmt: skip
    tiled = dict(
        inp_ptr=f32, slots_ptr="*i64", reset_ptr="*i8", h_ptr=f32, c_ptr=f32, w_in_ptr=wt, w_h_ptr=wt, bias_ptr=f32,
        hn_ptr=f32, B=i32, K_in=i32, S=i32, H=i32, layer=i32, HAS_RESET="constexpr", IN_PLACE="constexpr",
        SCATTER_PREV="constexpr", **cexpr,
    )  # fmt: skip
    scatter = dict(
        src_ptr=f32, slots_ptr="*i64", h_ptr=f32, B=i32, S=i32, H=i32, layer=i32, BLOCK_B="constexpr",
        BLOCK_H="constexpr",
    )  # fmt: skip
    fwd_step = dict(xw_ptr=f32, wh_ptr=wt, hs_ptr=f32, cs_ptr=f32, gates_ptr=f32, B=i32, T=i32, H=i32, t=i32, **cexpr)
    bwd_step = dict(
        dy_ptr=f32, dhn_ptr=f32, dc_ptr=f32, gates_ptr=f32, cs_ptr=f32, w_ptr=wt, dg_ptr=f32, dh0_ptr=f32, B=i32,
        T=i32, H=i32, t=i32, FIRST="constexpr", FINAL="constexpr", **cexpr,
    )  # fmt: skip
    return {
        "_lstm_step_kernel": step, "_lstm_seq_fwd_kernel": fwd, "_lstm_seq_bwd_kernel": bwd,
        "_lstm_step_tiled_kernel": tiled, "_scatter_rows_kernel": scatter,
        "_lstm_seq_fwd_step_kernel": fwd_step, "_lstm_seq_bwd_step_kernel": bwd_step,
    }  # fmt: skip


def _jobs(tk, H: int, layers: list[int], prec: str) -> list[tuple[str, object, dict]]:
    """(kernel, launch config, constexprs) for every kernel and variant the launchers use at hidden size H."""
    rows = tk.launch_config(H, on_cuda=True)._replace(prec=prec)
    tiled = tk.tiled_config(tk.TILED_STEP, H, on_cuda=True)._replace(prec=prec)
    steps = tk._steps_config(tk.STEPS_SEQUENCE, on_cuda=True)._replace(prec=prec)
    jobs = [("_lstm_step_kernel", rows, {**rows.constexprs(), "L": L, "HAS_RESET": True}) for L in layers]
    jobs += [("_lstm_seq_fwd_kernel", rows, rows.constexprs()), ("_lstm_seq_bwd_kernel", rows, rows.constexprs())]
    jobs += [
        ("_lstm_step_tiled_kernel", tiled,
         {**tiled.constexprs(), "HAS_RESET": True, "IN_PLACE": False, "SCATTER_PREV": True}),
        ("_lstm_seq_fwd_step_kernel", steps, steps.constexprs()),
        ("_lstm_seq_bwd_step_kernel", steps, {**steps.constexprs(), "FIRST": False, "FINAL": False}),
    ]  # fmt: skip
    scatter = tk.LaunchConfig(*tk.SCATTER_BLOCKS, 16, tk.SCATTER_WARPS, 1, prec)
    jobs.append(("_scatter_rows_kernel", scatter, {"BLOCK_B": scatter.block_b, "BLOCK_H": scatter.block_h}))
    return jobs


def _adaptation_jobs() -> list[tuple[str, dict, dict]]:
    """(kernel, signature, constexprs) for kernels/triton_adaptation.py's two kernels, which do not depend on H: with
    and without the level, at one forecast column of one feature and at 64 of 64."""
    f32, i32 = "*fp32", "i32"
    begin = dict(
        table_ptr=f32, init_ptr=f32, slots_ptr="*i64", reset_ptr="*i1", x_ptr=f32, dx_ptr=f32, cols_ptr="*i64",
        steps_ptr=f32, inputs_ptr=f32, factor_ptr=f32, offset_ptr=f32, B=i32, W=i32, IN=i32, OUT=i32, NSTEPS=i32,
        clip_at="fp32", scale_clip="fp32", floor_at="fp32", level_rate="fp32", level_rest="fp32",
        HAS_RESET="constexpr", LEVEL="constexpr", BLOCK_R="constexpr", BLOCK_I="constexpr", BLOCK_O="constexpr",
    )  # fmt: skip
    finish = dict(
        table_ptr=f32, slots_ptr="*i64", x_ptr=f32, cols_ptr="*i64", change_ptr=f32, factor_ptr=f32, offset_ptr=f32,
        out_ptr=f32, B=i32, W=i32, IN=i32, OUT=i32, LEVEL="constexpr", BLOCK_R="constexpr", BLOCK_O="constexpr",
    )  # fmt: skip
    from lstmd.kernels.triton_adaptation import rows_per_program

    jobs = []
    for level in (False, True):
        for width in (1, 64):
            rows = rows_per_program(width, width)
            jobs.append(("_adapt_begin_kernel", begin, {"HAS_RESET": True, "LEVEL": level, "BLOCK_R": rows,
                                                        "BLOCK_I": width, "BLOCK_O": width}))  # fmt: skip
            jobs.append(("_adapt_finish_kernel", finish, {"LEVEL": level, "BLOCK_R": rows, "BLOCK_O": width}))
    return jobs


def _resources(cubin: bytes) -> str:
    """'REG:n STACK:n' from cuobjdump, or '' where it is not available."""
    import triton.backends.nvidia as nv

    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    return " ".join(re.findall(r"REG:\d+|STACK:\d+", out))


def _compile(fn, signature: dict, consts: dict, num_warps: int, num_stages: int, label: str, target, limit) -> bool:
    """Compile one kernel configuration for `target` and print one line: ok, or FAIL with why (a compile error or
    more shared memory than `limit`), with registers and spills where cuobjdump tells them."""
    import triton
    from triton.compiler import ASTSource

    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=consts)
        kernel = triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as exc:  # report every failing configuration, then fail
        print(f"FAIL {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        return False
    shared = kernel.metadata.shared
    res = _resources(kernel.asm["cubin"]) if "cubin" in kernel.asm else ""
    ok = shared <= limit
    print(f"{'ok  ' if ok else 'FAIL'} {label} warps={num_warps} stages={num_stages} shared={shared} {res}")
    return ok


def run(hidden: list[int], layers: list[int], weight_dtypes: list[str], arch: int, precisions: list[str]) -> int:
    from lstmd.kernels import triton_lstm as tk
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    limit = SHARED_LIMIT.get(arch, 232448)
    failures = 0
    print(f"target sm_{arch}, shared-memory limit {limit} bytes per block")
    for wd, prec in [(wd, prec) for wd in weight_dtypes for prec in precisions]:
        sigs = _signatures("*fp32" if wd == "fp32" else "*bf16")
        for H in hidden:
            for name, cfg, consts in _jobs(tk, H, layers, prec):
                label = (
                    f"{name:26s} H={H:<4d} BLOCK_B={cfg.block_b:<3d} BLOCK_H={cfg.block_h:<4d} {wd:4s} {prec:4s} "
                    f"{consts.get('L', '')!s:>2s}"
                )
                failures += not _compile(getattr(tk, name), sigs[name], consts, cfg.num_warps, cfg.num_stages,
                                         label, target, limit)  # fmt: skip
    from lstmd.kernels import triton_adaptation as ta

    for name, signature, consts in _adaptation_jobs():
        label = f"{name:26s} LEVEL={consts['LEVEL']!s:5s} BLOCK_R={consts['BLOCK_R']:<3d} "
        label += f"BLOCK_O={consts['BLOCK_O']:<3d}"
        failures += not _compile(getattr(ta, name), signature, consts, 4, 1, label, target, limit)
    print("all kernels compiled within limits" if failures == 0 else f"{failures} configuration(s) failed")
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[48, 128, 256, 512])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--weights", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10, e.g. 90 for H100")
    parser.add_argument(
        "--precision", nargs="+", choices=["tf32", "ieee"], default=["tf32"],
        help="tl.dot input precision: tf32 is the GPU default, ieee what the tight CUDA tests use",
    )  # fmt: skip
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "lstmd.kernels.compile_check", *sys.argv[1:]]
        sys.exit(subprocess.run(cmd, env=env).returncode)
    sys.exit(run(args.hidden, args.layers, args.weights, args.arch, args.precision))


if __name__ == "__main__":
    main()
