"""Benchmark of the LSTM kernels: `python -m lstmd.kernels.bench` (a script, not a test; prints a table last).

On CUDA (issue 17's sweep; about 2 minutes on one H100, `--quick` the target shapes only; `--json FILE` keeps
the rows, the device and the targets for docs/benchmarks.md):
  - the HBM ceiling: a 2 GiB device-to-device copy (bytes read + written); "% HBM" is against it.
  - step over a resident table, S = 1,000,000 rows, I = 64, L = 1, B in {256, 4096, 16384}, H in {128, 256, 512}:
    PyTorch eager (index_select + cell + index_copy_, the reference backend) and the same captured in a CUDA
    graph; each Triton plan ("rows", "tiled", forced; "(auto)" marks plan_step's choice) launched and in a CUDA
    graph; the public lstm_step_ (which checks slot values: one sync); bf16 weights.
  - a TBPTT window, B = 256, T = 64, L = 2, H in {128, 256}, and the trainer's default B = 64, T = 32 (L = 1,
    H = 256), forward + backward: each Triton sequence plan ("rows", "steps") vs cuDNN nn.LSTM.
  - issue 17's kernel targets, MET or MISS, computed from the rows above.
  Times are triton.testing.do_bench medians; tables and inputs are random (METHOD.md: never zeros).
On the CPU (no GPU): the reference step vs a naive per-stream Python loop, and the reference sequence vs
nn.LSTM, at small sizes, timed as medians of time.perf_counter() over repeats, so the script runs everywhere.

Shapes: B events in the batch, S state-table rows, L layers, H hidden, I input, T time steps.
Bytes per step and layer: gather h, c and scatter h, c (4·B·H·4), x (B·I_l·4), y (B·H·4), weights once
(4H·(I_l + H)·bytes per weight); FLOPs: 2·B·4H·(I_l + H) per layer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from lstmd.kernels import lstm_sequence, lstm_step_, reference

Row = dict[str, object]


def _params(IN: int, H: int, L: int, device: str, dtype=torch.float32):  # noqa: N803 (legend letter)
    torch.manual_seed(0)
    m = torch.nn.LSTM(IN, H, L, batch_first=True).to(device)
    params = [
        tuple(getattr(m, f"{n}_l{k}").detach().to(dtype) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        for k in range(L)
    ]
    return m, params


def _step_bytes_flops(B: int, IN: int, H: int, L: int, wbytes: int = 4) -> tuple[int, int]:
    total_bytes = flops = 0
    for layer in range(L):
        k_in = IN if layer == 0 else H
        total_bytes += 4 * B * H * 4 + B * k_in * 4 + 4 * H * (k_in + H) * wbytes
        flops += 2 * B * 4 * H * (k_in + H)
    return total_bytes + B * H * 4 + B * 8, flops  # + y and the slots


def _cpu_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """(median, min) wall time in ms per function. Runs are interleaved round by round, so that load from other
    processes on a shared machine hits every implementation alike; one warm-up run each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


def _naive_step(x, slots, h, c, params) -> torch.Tensor:
    """What a per-stream server does: one stream at a time, every layer, row by row."""
    outs = []
    for b in range(x.shape[0]):
        s = int(slots[b])
        inp = x[b : b + 1]
        for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(params):
            h_new, c_new = reference._cell(inp, h[layer, s : s + 1], c[layer, s : s + 1], w_ih, w_hh, b_ih + b_hh)
            h[layer, s] = h_new[0]
            c[layer, s] = c_new[0]
            inp = h_new
        outs.append(inp)
    return torch.cat(outs)


def bench_cpu() -> list[Row]:
    rows: list[Row] = []
    S, IN = 10_000, 16
    with torch.no_grad():
        for L, H, B in [(1, 64, 16), (1, 64, 256), (1, 128, 256), (2, 128, 256)]:
            _, params = _params(IN, H, L, "cpu")
            h, c = torch.zeros(L, S, H), torch.zeros(L, S, H)
            slots = torch.randperm(S)[:B]
            x = torch.randn(B, IN)
            nbytes, flops = _step_bytes_flops(B, IN, H, L)
            timed = _cpu_times(
                {
                    "reference (torch, batched)": lambda: lstm_step_(x, slots, h, c, params, backend="torch"),  # noqa: B023
                    "naive per-stream loop": lambda: _naive_step(x, slots, h, c, params),  # noqa: B023
                },
                repeats=7,
            )
            base = timed["naive per-stream loop"][0]
            for name, (ms, ms_min) in timed.items():
                rows.append(_row("step", f"B={B} H={H} L={L} I={IN} S={S}", name, ms, nbytes, flops, base, ms_min))
    for B, T, H, L in [(16, 16, 64, 2), (64, 32, 128, 2)]:
        m, params = _params(IN, H, L, "cpu")
        x = torch.randn(B, T, IN)
        h0 = torch.zeros(L, B, H)

        def ref_step():
            y, (h_n, _) = lstm_sequence(x, h0, h0, params, backend="torch")  # noqa: B023
            torch.autograd.grad(y.sum() + h_n.sum(), [w for p in params for w in p], allow_unused=True)  # noqa: B023

        def torch_lstm():
            y, (h_n, _) = m(x, (h0, h0))  # noqa: B023
            (y.sum() + h_n.sum()).backward()

        for p in params:
            for w in p:
                w.requires_grad_()
        timed = _cpu_times({"nn.LSTM (CPU)": torch_lstm, "reference (torch)": ref_step}, repeats=7)
        flops = 3 * sum(2 * B * T * 4 * H * ((IN if k == 0 else H) + H) for k in range(L))  # fwd + 2x bwd
        shape = f"B={B} T={T} H={H} L={L} I={IN}"
        for name, (ms, ms_min) in timed.items():
            rows.append(_row("tbptt fwd+bwd", shape, name, ms, None, flops, timed["nn.LSTM (CPU)"][0], ms_min))
    return rows


# Datasheet HBM bandwidth (GB/s) by device name; the sweep also measures a device-to-device copy and reports
# "% HBM" against that measured ceiling (METHOD.md: datasheet rates are leads).
DATASHEET_GBPS = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H200": 4800}


def _copy_gbps() -> float:
    """Measured HBM ceiling: a 2 GiB device-to-device copy, bytes read plus written, median of do_bench."""
    import triton.testing

    src = torch.randn(1 << 29, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * 4 / ms / 1e6  # the buffers go when this returns


def _graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """fn captured in a CUDA graph (after warm-up runs on a side stream); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def bench_cuda(quick: bool = False) -> list[Row]:
    """The sweep of issue 17 (budget: about 2 minutes on one H100; --quick: the target shapes only)."""
    import triton.testing

    return sweep(
        "cuda",
        S=1_000_000,
        hidden=(256,) if quick else (128, 256, 512),
        batches=(4096, 16384) if quick else (256, 4096, 16384),
        # issue 17's TBPTT target shapes, and the trainer's defaults (train.batch = 64 windows of k2 = 32)
        tbptt=[(256, 64, 2, 128), (256, 64, 2, 256)] + ([] if quick else [(64, 32, 1, 256)]),
        timed=lambda fn: triton.testing.do_bench(fn, return_mode="median"),
        graphed=_graphed,
    )


def sweep(dev, S, hidden, batches, tbptt, timed, graphed, IN: int = 64) -> list[Row]:  # noqa: N803 (legend)
    """The rows of bench_cuda on `dev` (tbptt: a list of (B, T, L, H)); `timed(fn)` → ms, `graphed(fn)` → a
    replay of fn captured in a CUDA graph. tests/test_kernels.py runs it on the CPU through the interpreter at
    tiny sizes (no timing, no graph), so the first GPU run does not find a typo here."""
    from lstmd.kernels import triton_lstm as tk

    rows: list[Row] = []
    L = 1
    with torch.no_grad():
        for H in hidden:
            _, params = _params(IN, H, L, dev)
            _, params_bf16 = _params(IN, H, L, dev, torch.bfloat16)
            weights = tk.prepare_step_weights(params)
            h = torch.randn(L, S, H, device=dev) * 0.1  # not zeros: METHOD.md (zeros can run faster)
            c = torch.randn(L, S, H, device=dev) * 0.1
            for B in batches:
                slots = torch.randperm(S, device=dev)[:B]
                x = torch.randn(B, IN, device=dev)
                y = torch.empty(B, H, device=dev)
                nbytes, flops = _step_bytes_flops(B, IN, H, L)
                auto = tk.plan_step(B, H)
                impls: dict[str, tuple[Callable[[], object], int]] = {
                    "torch eager": (lambda: reference.lstm_step_(x, slots, h, c, params), nbytes),  # noqa: B023
                }
                impls["torch eager, CUDA graph"] = (graphed(impls["torch eager"][0]), nbytes)
                for plan in (tk.rows_step(H), tk.TILED_STEP):
                    name = f"triton {plan.kind} {plan.block_b}x{plan.block_h}" + (" (auto)" if plan == auto else "")
                    run = lambda plan=plan: tk.launch_step(x, slots, h, c, weights, None, y, plan)  # noqa: B023, E731
                    impls[name] = (run, nbytes)
                    impls[name + ", CUDA graph"] = (graphed(run), nbytes)
                impls["triton auto, public lstm_step_ (slots checked: 1 sync)"] = (
                    lambda: lstm_step_(x, slots, h, c, params, backend="triton"),  # noqa: B023
                    nbytes,
                )
                nbytes_bf16, _ = _step_bytes_flops(B, IN, H, L, wbytes=2)
                impls["triton auto, bf16 weights"] = (
                    lambda: tk.lstm_step_(x, slots, h, c, params_bf16, out=y),  # noqa: B023
                    nbytes_bf16,
                )
                times = {name: timed(fn) for name, (fn, _) in impls.items()}
                shape = f"B={B} H={H} L={L} I={IN} S={S:.0e}".replace("e+0", "e")
                for name, (_, moved) in impls.items():
                    rows.append(_row("step", shape, name, times[name], moved, flops, times["torch eager"]))
            h = c = impls = None  # free the 2·S·H·4-byte tables (and the graphs' pools) before the next H
            torch.cuda.empty_cache()
    for B, T, L, H in tbptt:
        m, params = _params(IN, H, L, dev)
        for p in params:
            for w in p:
                w.requires_grad_()
        x = torch.randn(B, T, IN, device=dev)
        h0 = torch.randn(L, B, H, device=dev) * 0.1
        flat = [w for p in params for w in p]

        def ours(plan):
            tk.FORCE_SEQUENCE_PLAN = plan
            try:
                y, (h_n, _) = lstm_sequence(x, h0, h0, params, backend="triton")  # noqa: B023
                torch.autograd.grad(y.sum() + h_n.sum(), flat)  # noqa: B023
            finally:
                tk.FORCE_SEQUENCE_PLAN = None

        def cudnn():
            y, (h_n, _) = m(x, (h0, h0))  # noqa: B023
            torch.autograd.grad(y.sum() + h_n.sum(), list(m.parameters()))  # noqa: B023

        auto = tk.plan_sequence(B, H)
        t_cudnn = timed(cudnn)
        flops = 3 * sum(2 * B * T * 4 * H * ((IN if k == 0 else H) + H) for k in range(L))
        shape = f"B={B} T={T} H={H} L={L} I={IN}"
        for plan in (tk.rows_sequence(H), tk.STEPS_SEQUENCE):
            name = f"triton {plan.kind}" + (" (auto)" if plan == auto else "")
            rows.append(_row("tbptt fwd+bwd", shape, name, timed(lambda plan=plan: ours(plan)), None, flops, t_cudnn))
        rows.append(_row("tbptt fwd+bwd", shape, "cuDNN nn.LSTM", t_cudnn, None, flops, t_cudnn))
    return rows


def targets(rows: list[Row], hbm_gbps: float) -> list[tuple[str, str, bool | None]]:
    """Issue 17's kernel targets from the sweep: (target, measured, met?); None where the sweep lacks the shape."""

    def best(op, shape, prefix):
        ms = [r["ms"] for r in rows if r["op"] == op and r["shape"] == shape and str(r["impl"]).startswith(prefix)]
        return min(ms) if ms else None

    def one(op, shape, impl):
        return next((r for r in rows if r["op"] == op and r["shape"] == shape and r["impl"] == impl), None)

    out = []
    s4096, s16384 = "B=4096 H=256 L=1 I=64 S=1e6", "B=16384 H=256 L=1 I=64 S=1e6"
    tri, eager, graph = best("step", s4096, "triton"), one("step", s4096, "torch eager"), one(
        "step", s4096, "torch eager, CUDA graph"
    )
    if tri and eager and graph:
        out.append(("step B=4096 H=256 >= 3x torch eager", f"{eager['ms'] / tri:.2f}x", eager["ms"] / tri >= 3))
        ratio = graph["ms"] / tri
        out.append(("step B=4096 H=256 >= 1.5x eager CUDA graph", f"{ratio:.2f}x", ratio >= 1.5))
    best16k = max((r for r in rows if r["shape"] == s16384 and str(r["impl"]).startswith("triton")),
                  key=lambda r: r["GB/s"] or 0, default=None)  # fmt: skip
    if best16k:
        pct = 100 * best16k["GB/s"] / hbm_gbps
        out.append(("step B=16384 H=256 >= 50% of HBM (measured copy)", f"{pct:.0f}% ({best16k['impl']})", pct >= 50))
    for H in (128, 256):
        shape = f"B=256 T=64 H={H} L=2 I=64"
        tri, cud = best("tbptt fwd+bwd", shape, "triton"), one("tbptt fwd+bwd", shape, "cuDNN nn.LSTM")
        if tri and cud:
            out.append((f"TBPTT B=256 T=64 H={H} L=2 >= 1.0x cuDNN", f"{cud['ms'] / tri:.2f}x", cud["ms"] / tri >= 1.0))
    return out


def _row(op, shape, impl, ms, nbytes, flops, baseline_ms, ms_min=None) -> Row:
    return {
        "op": op,
        "shape": shape,
        "impl": impl,
        "ms": ms,
        "min ms": ms_min,
        "GB/s": None if nbytes is None else nbytes / ms / 1e6,
        "MB": None if nbytes is None else nbytes / 1e6,
        "GFLOP/s": flops / ms / 1e6,
        "speedup": baseline_ms / ms,
    }


def print_table(rows: list[Row], baseline: str) -> None:
    cols = ["op", "shape", "impl", "ms", "min ms", "MB", "GB/s", "% HBM", "GFLOP/s", "speedup"]

    def fmt(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"ms = median; speedup = {baseline} median / this median, same shape, same run")
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for row in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default); 1 is steadier on a busy host"
    )
    parser.add_argument("--quick", action="store_true", help="cuda: only the shapes of issue 17's targets")
    parser.add_argument("--json", dest="json_path", help="also write the rows, the device and the targets here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    torch.manual_seed(0)
    report: dict[str, object] = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__}
    if use_cuda:
        import triton

        torch.backends.cuda.matmul.allow_tf32 = True  # eager and cuDNN get TF32 too, like the Triton kernels
        torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name()
        hbm = _copy_gbps()
        torch.cuda.empty_cache()
        sheet = next((v for k, v in DATASHEET_GBPS.items() if k in name), None)
        print(f"device: {name}, torch {torch.__version__}, triton {triton.__version__}; device-to-device copy "
              f"{hbm:,.0f} GB/s (datasheet {sheet or '?'} GB/s)")  # fmt: skip
        rows = bench_cuda(quick=args.quick)
        for r in rows:
            r["% HBM"] = None if r["GB/s"] is None else 100 * r["GB/s"] / hbm
        print_table(rows, "torch eager (step) / cuDNN (tbptt)")
        met = targets(rows, hbm)
        print("\nissue 17 kernel targets (this run):")
        for what, measured, ok in met:
            print(f"  {'MET ' if ok else 'MISS'} {what}: {measured}")
        report |= {"device": name, "triton": triton.__version__, "copy_gbps": hbm, "datasheet_gbps": sheet,
                   "targets": [{"target": w, "measured": m, "met": ok} for w, m, ok in met]}  # fmt: skip
    else:
        print(f"device: CPU ({torch.get_num_threads()} threads), torch {torch.__version__}; no GPU")
        rows = bench_cpu()
        print_table(rows, "naive loop (step) / nn.LSTM (tbptt)")
        report["device"] = "cpu"
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report | {"rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
