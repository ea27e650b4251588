"""Benchmark of the LSTM kernels: `python -m lstmd.kernels.bench` (a script, not a test; prints a table last).

On CUDA (the sweep of issue 2; budget: under 4 minutes on one H100):
  - step over a resident table, S = 1,000,000 rows, I = 64, L = 1, B in {256, 4096, 16384}, H in {128, 256, 512}:
    Triton vs PyTorch eager (index_select + cell + index_copy_, the reference backend) vs the same eager step
    captured in a CUDA graph; bytes moved, FLOPs and achieved GB/s next to each time.
  - a TBPTT window, B = 256, T = 64, L = 2, H in {128, 256}, forward + backward: Triton vs cuDNN nn.LSTM.
  Times are triton.testing.do_bench medians.
On the CPU (no GPU): the reference step vs a naive per-stream Python loop, and the reference sequence vs
nn.LSTM, at small sizes, timed as medians of time.perf_counter() over repeats, so the script runs everywhere.

Shapes: B events in the batch, S state-table rows, L layers, H hidden, I input, T time steps.
Bytes per step and layer: gather h, c and scatter h, c (4·B·H·4), x (B·I_l·4), y (B·H·4), weights once
(4H·(I_l + H)·bytes per weight); FLOPs: 2·B·4H·(I_l + H) per layer.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from lstmd import kernels
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


def bench_cuda() -> list[Row]:
    import triton.testing

    rows: list[Row] = []
    dev = "cuda"
    S, IN, L = 1_000_000, 64, 1
    with torch.no_grad():
        for H in (128, 256, 512):
            _, params = _params(IN, H, L, dev)
            h = torch.zeros(L, S, H, device=dev)
            c = torch.zeros(L, S, H, device=dev)
            for B in (256, 4096, 16384):
                slots = torch.randperm(S, device=dev)[:B]
                x = torch.randn(B, IN, device=dev)
                nbytes, flops = _step_bytes_flops(B, IN, H, L)

                def eager():
                    return reference.lstm_step_(x, slots, h, c, params)  # noqa: B023

                graph = torch.cuda.CUDAGraph()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):
                        eager()
                torch.cuda.current_stream().wait_stream(side)
                with torch.cuda.graph(graph):
                    eager()
                t_tr = triton.testing.do_bench(lambda: lstm_step_(x, slots, h, c, params, backend="triton"))  # noqa: B023
                kernels.VALIDATE_SLOTS = False
                t_tr_nocheck = triton.testing.do_bench(
                    lambda: lstm_step_(x, slots, h, c, params, backend="triton")  # noqa: B023
                )
                kernels.VALIDATE_SLOTS = True
                t_eager = triton.testing.do_bench(eager)
                t_graph = triton.testing.do_bench(graph.replay)  # noqa: B023
                shape = f"B={B} H={H} L={L} I={IN} S=1e6"
                for name, ms in (
                    ("triton, slots checked (1 sync)", t_tr),
                    ("triton, VALIDATE_SLOTS=False", t_tr_nocheck),
                    ("torch eager", t_eager),
                    ("torch eager, CUDA graph", t_graph),
                ):
                    rows.append(_row("step", shape, name, ms, nbytes, flops, t_eager))
                del graph
            h = c = None  # free the 2·S·H·4-byte tables before the next H
            torch.cuda.empty_cache()
    B, T, L = 256, 64, 2
    for H in (128, 256):
        m, params = _params(IN, H, L, dev)
        for p in params:
            for w in p:
                w.requires_grad_()
        x = torch.randn(B, T, IN, device=dev)
        h0 = torch.zeros(L, B, H, device=dev)
        flat = [w for p in params for w in p]

        def ours():
            y, (h_n, _) = lstm_sequence(x, h0, h0, params, backend="triton")  # noqa: B023
            torch.autograd.grad(y.sum() + h_n.sum(), flat)  # noqa: B023

        def cudnn():
            y, (h_n, _) = m(x, (h0, h0))  # noqa: B023
            torch.autograd.grad(y.sum() + h_n.sum(), list(m.parameters()))  # noqa: B023

        t_ours = triton.testing.do_bench(ours)
        t_cudnn = triton.testing.do_bench(cudnn)
        flops = 3 * sum(2 * B * T * 4 * H * ((IN if k == 0 else H) + H) for k in range(L))
        shape = f"B={B} T={T} H={H} L={L} I={IN}"
        rows.append(_row("tbptt fwd+bwd", shape, "triton", t_ours, None, flops, t_cudnn))
        rows.append(_row("tbptt fwd+bwd", shape, "cuDNN nn.LSTM", t_cudnn, None, flops, t_cudnn))
    return rows


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
    cols = ["op", "shape", "impl", "ms", "min ms", "MB", "GB/s", "GFLOP/s", "speedup"]

    def fmt(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r[c]) for c in cols] for r in rows]
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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    torch.manual_seed(0)
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # eager and cuDNN get TF32 too, like the Triton kernels
        torch.backends.cudnn.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
        rows = bench_cuda()
        print_table(rows, "torch eager (step) / cuDNN (tbptt)")
    else:
        print(f"device: CPU ({torch.get_num_threads()} threads), torch {torch.__version__}; no GPU")
        rows = bench_cpu()
        print_table(rows, "naive loop (step) / nn.LSTM (tbptt)")


if __name__ == "__main__":
    main()
