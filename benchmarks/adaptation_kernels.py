"""The forecast adaptation on the Triton step: its two kernels (kernels/triton_adaptation.py) against the same
arithmetic as torch ops, in Engine.step of one forecast model on one device, with and without the level regressor.

Each setting is an Engine of its own (I = O = 8, H = 64, the Triton step, a wave of `--batch` streams among twice as
many slots, none fresh), timed in short blocks in rotating order; printed: the median µs per step of each and the
ratio torch ops / kernels. Written for CUDA (scripts/gpu-check runs it); on the CPU the kernels run through Triton's
interpreter (TRITON_INTERPRET=1), which says nothing about speed.

    python benchmarks/adaptation_kernels.py [--batch 1024 16384] [--rounds 30] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1024, 16384], help="events per wave")
    parser.add_argument("--rounds", type=int, default=30, help="blocks timed per setting")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported by the engine's kernels
    from lstmd.daemon.engine import Engine
    from lstmd.daemon.model import ModelSpec, ServingModel
    from lstmd.daemon.state_store import StateStore

    device = torch.device(args.device)
    spec = ModelSpec(8, 64, 1, 8, "forecast", ())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    settings = [(kind, level) for level in (0.0, 0.1) for kind in ("kernels", "torch ops")]
    runs = []
    for n in args.batch:
        rng = np.random.default_rng(0)
        walk = np.cumsum(rng.standard_normal((16, n, 8)), axis=0).astype(np.float32)
        slots = rng.choice(2 * n, n, replace=False).astype(np.int64)
        fresh = np.zeros(n, bool)
        engines = {}
        for kind, level in settings:
            engine = Engine(ServingModel.initial(spec, 0), StateStore(1, 64, 2 * n, device), device, "triton",
                            level=level)  # fmt: skip
            engine._adaptation_kernels = kind == "kernels"
            engines[kind, level] = engine
        block = max(3, 2048 // max(1, n // 64)) if device.type == "cuda" else 2

        def timed(key, block=block, engines=engines, walk=walk, slots=slots, fresh=fresh) -> float:
            sync()
            t0 = time.perf_counter()
            for i in range(block):
                engines[key].step(walk[i % 16], slots, fresh)
            sync()
            return (time.perf_counter() - t0) / block

        for key in engines:  # compile and warm every setting first
            timed(key)
        seconds = {key: [] for key in engines}
        keys = list(engines)
        for r in range(args.rounds):
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                seconds[key].append(timed(key))
        row = {"batch": n, "block": block}
        for (kind, level), values in seconds.items():
            row[f"{kind}{' + level' if level else ''}"] = float(np.median(values)) * 1e6
        runs.append(row)
        print(f"batch {n}: " + ", ".join(f"{k} {v:.0f} µs" for k, v in row.items() if k not in ("batch", "block"))
              + f"; torch ops / kernels: {row['torch ops'] / row['kernels']:.2f} (no level), "
              f"{row['torch ops + level'] / row['kernels + level']:.2f} (level)", flush=True)  # fmt: skip
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    result = {"device": name, "runs": runs, "rounds": args.rounds}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
