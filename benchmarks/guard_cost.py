"""The guard's share of end-to-end serving throughput: `lstmd bench` on a forecast model with the per-stream
adaptation on (the default) and off (`train.guard = false`), in interleaved pairs on one machine.

Each run starts a daemon of its own (`lstmd bench --set ...`: I = O = 8, H = 64, a fresh untrained model, training
off), measures events/s (closed loop unless `-- --rate N` offers a fixed rate) and the daemon's CPU seconds per
event (psutil), and stops it. Pairs alternate their order (on, off, off, on, ...), so a drift of the machine's load
hits both alike. Printed: every run, per setting the median events/s and CPU µs per event, the ratios on / off of
the medians with the range of the per-pair ratios, and the guard's share of each (1 - events/s on / off, and
1 - CPU per event off / on). On a shared machine throughput swings with the neighbours' load far more than the
daemon's CPU per event does; read the ranges, not only the medians.

    python benchmarks/guard_cost.py [--pairs 10] [--duration 3] [--warmup 1] [--json FILE] [-- EXTRA lstmd bench ARGS]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from compare_commits import parse_with_bench_args  # a sibling script (this directory is on sys.path)

MODEL = ["--set", "model.task=forecast", "--set", "model.output_size=8"]


def bench(guard: bool, args: argparse.Namespace, out: Path) -> dict:
    """One `lstmd bench` run with the guard on or off; its JSON summary."""
    cmd = [sys.executable, "-m", "lstmd.clients.cli", "bench", *MODEL, "--set", f"train.guard={str(guard).lower()}",
           "--duration", str(args.duration), "--warmup", str(args.warmup), "--out", str(out), *args.bench_args]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10, help="interleaved pairs of runs (default 10)")
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each window")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every run and the summary here")
    args = parse_with_bench_args(parser)
    runs = []
    with tempfile.TemporaryDirectory(prefix="lstmd-guard-") as root:
        for pair in range(args.pairs):
            for guard in (True, False) if pair % 2 == 0 else (False, True):
                summary = bench(guard, args, Path(root) / f"{pair}-{guard}.json")
                lstmd = next(r for r in summary["runs"] if r["server"] == "lstmd")
                run = {"pair": pair, "guard": guard, "events_per_s": lstmd["events_per_s"],
                       "cpu_us_per_event": 1e6 * lstmd["server_cpu_cores"] / lstmd["events_per_s"],
                       "load_avg_1m": os.getloadavg()[0]}  # fmt: skip
                runs.append(run)
                print(f"pair {pair} guard {'on ' if guard else 'off'}: {run['events_per_s']:,.0f} events/s, "
                      f"{run['cpu_us_per_event']:.3f} CPU µs per event (load {run['load_avg_1m']:.1f})", flush=True)
    result = {"runs": runs}
    for key in ("events_per_s", "cpu_us_per_event"):
        on = [r[key] for r in runs if r["guard"]]
        off = [r[key] for r in runs if not r["guard"]]
        ratios = [a / b for a, b in zip(on, off, strict=True)]
        result[key] = {"median_on": statistics.median(on), "median_off": statistics.median(off),
                       "ratio_on_over_off": statistics.median(on) / statistics.median(off),
                       "pair_ratio_median": statistics.median(ratios), "pair_ratio_range": [min(ratios), max(ratios)]}
    for key, share in (("events_per_s", lambda r: 1 - r), ("cpu_us_per_event", lambda r: 1 - 1 / r)):
        m = result[key]
        low, high = m["pair_ratio_range"]
        print(f"{key}: median on {m['median_on']:,.3f}, off {m['median_off']:,.3f}; on / off "
              f"{m['ratio_on_over_off']:.3f} (per pair: median {m['pair_ratio_median']:.3f}, {low:.3f} .. {high:.3f});"
              f" the guard's share {100 * share(m['ratio_on_over_off']):.1f}%")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
