"""Throughput of two commits, same machine, same workload: `lstmd bench --compare naive` runs, interleaved.

Each commit is checked out into a temporary git worktree with a virtual environment of its own (its C extension
built there; the dependencies come from the environment running this script), then N pairs of runs alternate
between the two (old, new, new, old, ...), so a drift of the machine's load hits both alike. Printed: every run,
then per commit the median lstmd events/s (and the naive baseline's, which tells how loaded the machine was),
and the ratio new / old of the medians with the range of the per-pair ratios. Numbers from a busy shared machine
say little: run this on a quiet host.

    python benchmarks/compare_commits.py OLD NEW [--pairs 6] [--duration 10] [--warmup 2] [--json FILE]
        [-- EXTRA lstmd bench ARGS]

OLD and NEW are anything git resolves to a commit (a hash, a branch, HEAD~3); the repository is the one this
script lives in, or --repo. The temporary worktrees are removed at the end, failures included.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def prepare(repo: Path, label: str, rev: str, root: Path) -> Path:
    """Check out `rev` under `root` and install it there (editable, no dependencies); returns its python."""
    sha = git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}")
    tree = root / f"{label}-{sha[:12]}"
    git(repo, "worktree", "add", "--detach", str(tree), sha)
    venv = tree / ".venv-compare"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # The dependencies are this interpreter's (torch, pyzmq, ...), appended after the venv's own site-packages.
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    deps.append(sysconfig.get_paths()["purelib"])
    Path(purelib, "zz_compare_deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    # The venv's own setuptools may be too old for pyproject's license field: build with the environment's.
    subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=False,
                   capture_output=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(tree)],
                   check=True)
    # An lstmd installed (not editable) in the environment would shadow the checkout: then comparing is pointless.
    found = subprocess.run([str(python), "-c", "import lstmd.daemon.server as s; print(s.__file__)"], check=True,
                           capture_output=True, text=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"{rev}: lstmd imports from {found}, not from its checkout {tree}: run this script from "
                         "an environment where lstmd is not installed, or installed editable")
    return python


def bench(python: Path, args: argparse.Namespace, out: Path) -> dict:
    """One `lstmd bench --compare naive` run with the commit's own code; its JSON summary."""
    help_text = subprocess.run([str(python), "-m", "lstmd.clients.cli", "bench", "--help"], check=True,
                               capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}).stdout
    # `--out FILE` since issue 13's time; before it `--json FILE` wrote the file.
    to_file = ["--out", str(out)] if "--out" in help_text else ["--json", str(out)]
    cmd = [str(python), "-m", "lstmd.clients.cli", "bench", "--compare", "naive", "--duration", str(args.duration),
           "--warmup", str(args.warmup), *to_file, *args.bench_args]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def events_per_s(summary: dict, server: str) -> float:
    return next(r["events_per_s"] for r in summary["runs"] if r["server"] == server)


def report(old: str, new: str, runs: list[dict]) -> dict:
    by = {label: [r for r in runs if r["label"] == label] for label in ("old", "new")}
    medians = {label: {server: statistics.median(r[server] for r in rs) for server in ("lstmd", "naive")}
               for label, rs in by.items()}
    pair_ratios = [n["lstmd"] / o["lstmd"] for o, n in zip(by["old"], by["new"], strict=True)]
    return {
        "old": {"rev": old, "median_events_per_s": medians["old"]},
        "new": {"rev": new, "median_events_per_s": medians["new"]},
        "ratio_new_over_old": medians["new"]["lstmd"] / medians["old"]["lstmd"],
        "pair_ratio_range": [min(pair_ratios), max(pair_ratios)],
        "runs": runs,
    }


def parse_with_bench_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The command line's arguments up to `--`, with everything after it as `bench_args` (more `lstmd bench`
    arguments, passed on as they are); `--pairs` (the parser's) at least 1. Shared with benchmarks/guard_cost.py."""
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.bench_args = argv[split + 1 :]
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--pairs", type=int, default=6, help="interleaved pairs of runs (default 6)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per server and run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each window")
    parser.add_argument("--repo", type=Path, default=REPO, help="the git repository (default: this script's)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every run and the summary here")
    args = parse_with_bench_args(parser)
    root = Path(tempfile.mkdtemp(prefix="lstmd-compare-"))
    try:
        pythons = {}
        for label, rev in (("old", args.old), ("new", args.new)):
            print(f"preparing {label} = {rev} in {root} ...", file=sys.stderr, flush=True)
            pythons[label] = prepare(args.repo, label, rev, root)
        runs = []
        for pair in range(args.pairs):
            order = ("old", "new") if pair % 2 == 0 else ("new", "old")  # ABBA: a drift in load hits both alike
            for label in order:
                summary = bench(pythons[label], args, root / f"{label}-{pair}.json")
                run = {"pair": pair, "label": label, "lstmd": events_per_s(summary, "lstmd"),
                       "naive": events_per_s(summary, "naive"), "load_avg_1m": summary["machine"]["load_avg_1m"]}
                runs.append(run)
                print(f"pair {pair} {label}: lstmd {run['lstmd']:,.0f} events/s, naive {run['naive']:,.0f} "
                      f"(load {run['load_avg_1m']})", flush=True)
        result = report(args.old, args.new, runs)
    finally:
        for tree in root.iterdir() if root.is_dir() else ():
            if tree.is_dir():
                subprocess.run(["git", "-C", str(args.repo), "worktree", "remove", "--force", str(tree)],
                               check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run(["git", "-C", str(args.repo), "worktree", "prune"], check=False, capture_output=True)
    for label in ("old", "new"):
        m = result[label]["median_events_per_s"]
        print(f"{label} {result[label]['rev']}: median lstmd {m['lstmd']:,.0f} events/s, naive {m['naive']:,.0f} "
              f"({args.pairs} run(s))")
    low, high = result["pair_ratio_range"]
    print(f"new / old: {result['ratio_new_over_old']:.3f} (pairs {low:.3f} .. {high:.3f})")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
