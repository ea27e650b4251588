"""Multi-step accuracy: does `train.horizon` make forecasts beyond one step better? (issue 14's benchmark)

Real seasonal series that ship inside statsmodels (no downloads at run time; `pip install -e '.[bench]'`), each run
online through daemons exactly as benchmarks/learning.py runs them: one event per tick, a training round every
`--round-every` ticks (asked for with `train now` and waited for, so the numbers do not depend on the machine's
speed). At every tick t of the second half, after event t, each daemon is asked `Producer.forecast(horizon=24)`
and each step h is scored against the real event t + h. Mean absolute error at horizons 1, 6 and 24 (in the
series' own units) of:
- last value: x_t at every step;
- seasonal naive: the value one season before the target (x_{t+h-m*ceil(h/m)}, m the season);
- frozen: the untrained model (same seed), training off;
- lstmd with train.horizon = 1, 6, 24 (`--horizons`), otherwise the same settings.
Every daemon runs the same model seed and training settings; only train.horizon differs. One table per series.

    python benchmarks/multistep.py                       # co2 weekly (m = 52) and elnino monthly (m = 12)
    python benchmarks/multistep.py --series co2 --horizons 1 6 --set train.lr=0.003
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning import start_daemon  # noqa: E402 (the learning benchmark's daemon setup: loopback, CPU)

REPORTED = (1, 6, 24)
FORECAST_STEPS = 24
# name: (loader from statsmodels.datasets, season in events)
SERIES = {
    "co2": (lambda d: d.co2.load_pandas().data["co2"].interpolate().bfill(), 52),
    "elnino": (lambda d: d.elnino.load_pandas().data.iloc[:, 1:].stack(), 12),
}
MODEL = ["model.task=forecast", "model.input_size=1", "model.output_size=1", "model.hidden_size=16",
         "state.capacity=4"]  # fmt: skip
# benchmarks/learning.py's co2 settings, with windows of 32 events so a 24-step rollout has targets inside them.
TRAIN = ["train.enabled=true", "train.interval=0", "train.k2=32", "train.record_steps=512", "train.holdout_windows=4",
         "train.batch=32", "train.steps=5", "train.lr=0.003", "train.min_windows=1"]  # fmt: skip


def load(name: str) -> tuple[np.ndarray, int]:
    try:
        import statsmodels.api as sm
    except ImportError:
        sys.exit("this benchmark needs statsmodels: pip install statsmodels (or pip install -e '.[bench]')")
    loader, season = SERIES[name]
    return np.asarray(loader(sm.datasets), np.float32), season


def baselines(x: np.ndarray, season: int, origins: np.ndarray) -> dict[str, np.ndarray]:
    """[origins, FORECAST_STEPS] forecasts of the last value and the seasonal naive (NaN where not defined)."""
    h = np.arange(1, FORECAST_STEPS + 1)
    lag = h - season * np.ceil(h / season).astype(int)  # <= 0: the value a whole number of seasons before
    at = origins[:, None] + lag[None, :]
    seasonal = np.where(at >= 0, x[np.clip(at, 0, None)], np.nan)
    return {"last value": np.repeat(x[origins, None], FORECAST_STEPS, 1), "seasonal naive": seasonal}


def run_daemons(x: np.ndarray, variants: dict[str, list[str]], round_every: int, seed: int) -> dict:
    """Feed the series to one daemon per variant; forecasts [origins, FORECAST_STEPS] from every tick of the
    second half, and each trained daemon's round outcomes."""
    from lstmd.clients import Admin, Producer

    n, half = len(x), len(x) // 2
    origins = np.arange(half, n - 1)
    forecasts = {k: np.full((len(origins), FORECAST_STEPS), np.nan, np.float32) for k in variants}
    rounds = {k: {"rounds": 0, "published": 0, "seconds": 0.0} for k in variants}
    with tempfile.TemporaryDirectory(prefix="lstmd-multistep-") as tmp:
        daemons = {k: start_daemon(Path(tmp) / f"d{i}", [*MODEL, f"model.seed={seed}", *extra])
                   for i, (k, extra) in enumerate(variants.items())}  # fmt: skip
        producers = {k: Producer(d.endpoints["events"]) for k, d in daemons.items()}
        admins = {k: Admin(d.endpoints["control"]) for k, d in daemons.items()}
        guards = {}
        try:
            for t in range(n):
                event = x[t : t + 1, None]
                for k, producer in producers.items():
                    producer.send([0], event)
                    if t >= half and t < n - 1:
                        forecasts[k][t - half] = producer.forecast([0], horizon=FORECAST_STEPS)[0, :, 0]
                if t > 0 and t % round_every == 0:
                    for k, admin in admins.items():
                        if k == "frozen":
                            continue
                        started = time.perf_counter()
                        status = admin.train_now(wait=300)
                        rounds[k]["seconds"] += time.perf_counter() - started
                        rounds[k]["rounds"] += 1
                        rounds[k]["published"] += status["last_round"]["outcome"] == "published"
            guards = {k: admin.train_status().get("guard") for k, admin in admins.items() if k != "frozen"}
        finally:
            for producer in producers.values():
                producer.close()
            for daemon in daemons.values():
                daemon.stop_and_join()
    for k, guard in guards.items():  # the served forecasts' shrink toward the last value, at the end
        rounds[k]["mean_gain"] = (guard or {}).get("mean_gain")
    return {"origins": origins, "forecasts": forecasts, "rounds": rounds}


def mae_by_horizon(x: np.ndarray, origins: np.ndarray, forecast: np.ndarray) -> dict[int, float]:
    """Mean absolute error at each reported horizon h over the origins whose target t + h exists."""
    out = {}
    for h in REPORTED:
        ok = origins + h < len(x)
        err = np.abs(forecast[ok, h - 1] - x[origins[ok] + h])
        out[h] = float(np.nanmean(err))
    return out


def run_series(name: str, args) -> dict:
    x, season = load(name)
    variants = {"frozen": []}
    for k in args.horizons:
        variants[f"lstmd train.horizon={k}"] = [*TRAIN, f"train.horizon={k}", *args.set]
    started = time.perf_counter()
    run = run_daemons(x, variants, args.round_every, args.seed)
    origins = run["origins"]
    table = {k: mae_by_horizon(x, origins, f) for k, f in baselines(x, season, origins).items()}
    table |= {k: mae_by_horizon(x, origins, f) for k, f in run["forecasts"].items()}
    return {"series": name, "events": len(x), "season": season, "origins": len(origins), "table": table,
            "rounds": run["rounds"], "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def print_series(result: dict) -> None:
    table = result["table"]
    last = table["last value"]
    print(f"\n## {result['series']}: {result['events']} events, season {result['season']}, forecasts of "
          f"{FORECAST_STEPS} steps from each of the last {result['origins']} ticks ({result['seconds']} s)")
    print("| forecast | " + " | ".join(f"MAE h={h} | / last value" for h in REPORTED) + " |")
    print("|---" * (1 + 2 * len(REPORTED)) + "|")
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[h]:.4f} | {row[h] / last[h]:.3f}" for h in REPORTED) + " |")
    for name, r in result["rounds"].items():
        if r["rounds"]:
            print(f"{name}: {r['rounds']} rounds, {r['published']} published, {r['seconds']:.1f} s in rounds, "
                  f"the guard's mean gain at the end {r.get('mean_gain')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", nargs="+", choices=sorted(SERIES), default=["co2", "elnino"])
    parser.add_argument("--horizons", type=int, nargs="+", default=[1, 6, 24], help="train.horizon values")
    parser.add_argument("--round-every", type=int, default=13, help="ticks between training rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides for the trained daemons")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    print(f"# lstmd multi-step accuracy: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    results = [run_series(name, args) for name in args.series]
    for result in results:
        print_series(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
