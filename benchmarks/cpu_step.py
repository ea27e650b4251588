"""The daemon's CPU serving step alone: the fused C step vs the torch-ops step vs the reference kernel + head.

Same run, interleaved round by round, best of `--rounds` per implementation (this 2-core VM's speed drifts by
±20% between phases, so every ratio is within one round). Slots are random rows of a 100k-row table (the
worst case for the gather and scatter: a producer that sends its streams in order gets contiguous rows).

    python benchmarks/cpu_step.py [--hidden 64] [--input 8] [--layers 1] [--batches 1000,4096,10000]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
from lstmd.daemon.model import ModelSpec, ServingModel
from lstmd.kernels import reference
from lstmd.kernels.cpu_step import CpuStep, fused_available


def _time(fn, repeats: int) -> float:
    fn()  # warm: weights prepared, buffers allocated
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def _reference_step(model, x, slots, h, c) -> torch.Tensor:
    """The kernels' reference step and the head, as the daemon served before its own CPU step."""
    weight, bias = model.head
    return torch.nn.functional.linear(reference.lstm_step_(x, slots, h, c, model.params), weight, bias)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--input", type=int, default=8)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--batches", default="1000,4096,10000")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the daemon's default (serve.cpu_threads = 1)
    model = ServingModel.initial(ModelSpec(args.input, args.hidden, args.layers, 1, "regression", ()), 0)
    h = torch.randn(args.layers, args.rows, args.hidden) * 0.5
    c = torch.randn(args.layers, args.rows, args.hidden) * 0.5
    impls = {"reference + head": None, "torch ops, 1 thread": CpuStep(1, fused=False)}
    if fused_available():
        impls |= {"fused C, 1 thread": CpuStep(1, fused=True), "fused C, 2 threads": CpuStep(2, fused=True)}
    print(f"H={args.hidden} I={args.input} L={args.layers}, {args.rows:,} state rows, torch {torch.__version__}")
    print(f"{'batch':>6} | {'implementation':<20} | {'Mevents/s':>9} | vs reference")
    for batch in [int(b) for b in args.batches.split(",")]:
        x = torch.randn(batch, args.input)
        slots = torch.randperm(args.rows)[:batch]
        repeats = max(3, 200_000 // batch)
        best = dict.fromkeys(impls, float("inf"))
        with torch.inference_mode():
            for _ in range(args.rounds):
                for name, step in impls.items():
                    fn = partial(_reference_step, model) if step is None else partial(step, model)
                    best[name] = min(best[name], _time(partial(fn, x, slots, h, c), repeats))
        for name, seconds in best.items():
            ratio = best["reference + head"] / seconds
            print(f"{batch:>6} | {name:<20} | {batch / seconds / 1e6:>9.2f} | {ratio:.2f}x")
    for step in impls.values():
        if step is not None:
            step.close()


if __name__ == "__main__":
    main()
