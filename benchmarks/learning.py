"""Does online training help, and does it leave inference alone? Three parts, each printing a table.

1. synthetic: `PeriodicStreams` (many streams, 2 channels: sinusoids + offset + drift + noise) with a regime
   change half-way (`shift()`: new frequencies, amplitudes, offsets). After the change it prints, per block
   of events, the mean absolute one-step error of
     (a)  the frozen initial model (a daemon with training off, same seed),
     (a') the model frozen at the change (the online model's weights at the change, training off after it),
     (b)  the naive last-value forecast,
     (c)  lstmd with online training.
   Target: (c) <= (a) / 2 and (c) < (b) within the first block of events after the change.
2. co2: one real public series, the weekly Mauna Loa CO2 record 1958-2001 (2,284 weeks, shipped inside
   statsmodels: `pip install statsmodels`, or the `lstmd[bench]` extra), a trending, seasonal series, as one
   stream. Same predictors (a), (b), (c).
3. latency: the daemon as a real `lstmd serve` subprocess; a producer sends small messages back to back and
   times each reply, first with no round running, then while rounds run back to back.

In parts 1 and 2 the benchmark asks for a round every `--round-every` events per stream and waits for it (the
producer pauses), so the errors do not depend on how fast the machine trains; part 3 measures what training
concurrently costs the serving path.

    python benchmarks/learning.py                   # all three parts
    python benchmarks/learning.py --part synthetic  # or co2, latency, suite, guard

4. suite: eight real series from statsmodels as streams of one daemon (standardised on their first quarter,
   one-step-ahead, online, error on the second half) against the last value, seasonal naive, the frozen model
   and deep-river's rolling LSTM regressor (`--deep-river-python` or LSTMD_DEEP_RIVER_PYTHON: a Python with
   deep-river, in its own virtual environment; it pins an older torch). One table and the geometric means. The
   trained daemon runs with the defaults (the level regressor, `train.level_rate = 0.1`, included) but
   `train.min_windows = 1`; `--suite-set` overrides any of them.
5. guard: the per-stream adaptation's share of the serving step's time (in process, an A/B of interleaved pairs).
6. level-cost (`--part level-cost` only): Engine.step with the guard's level regressor, fused in C and as torch
   ops, against each without it.
7. bounds (`--part bounds` only, statsmodels): classical one-step forecasters (ARIMA fits) on the suite's series,
   the reference for what the suite's accuracy targets ask.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SERVE_LOOPBACK = [
    "serve.events=tcp://127.0.0.1:*",
    "serve.control=tcp://127.0.0.1:*",
    "serve.publish=",
    "serve.metrics=",
    "serve.device=cpu",
]


def start_daemon(state_dir: Path, overrides: list[str]):
    from lstmd.daemon.config import load_config
    from lstmd.daemon.server import Daemon
    from prometheus_client import CollectorRegistry

    config = load_config(overrides=[*SERVE_LOOPBACK, f"state.dir={state_dir}", *overrides], environ={})
    daemon = Daemon(config, registry=CollectorRegistry())
    daemon.start_in_thread()
    return daemon


def run_learning(
    series: np.ndarray,  # [ticks, streams, dim]: every stream's events, tick by tick
    change: int,  # tick of the regime change (errors are reported from here on)
    model: list[str],
    train: list[str],
    round_every: int,  # ticks between training rounds
    blocks: list[tuple[int, int]],  # (first tick, end tick) ranges to report, relative to `change`
    label: str,
) -> dict:
    from lstmd.clients import Admin, Producer

    ticks, n, dim = series.shape
    ids = list(range(n))
    with tempfile.TemporaryDirectory(prefix="lstmd-learning-") as tmp:
        online = start_daemon(Path(tmp) / "online", [*model, "train.enabled=true", "train.interval=0", *train])
        frozen = start_daemon(Path(tmp) / "frozen", model)
        at_change = start_daemon(Path(tmp) / "at-change", model)
        admin = Admin(online.endpoints["control"])
        producers = {
            k: Producer(d.endpoints["events"]) for k, d in (("c", online), ("a", frozen), ("a_change", at_change))
        }
        errors = {k: np.full(ticks, np.nan) for k in ("a", "a_change", "b", "c")}
        forecasts: dict[str, np.ndarray | None] = dict.fromkeys(("a", "a_change", "c"))
        rounds, published, started = 0, 0, time.perf_counter()
        try:
            for t in range(ticks):
                x = series[t]
                if t > 0:
                    errors["b"][t] = np.abs(series[t - 1] - x).mean()
                    for k, f in forecasts.items():
                        errors[k][t] = np.abs(f - x).mean()
                if t == change:  # (a'): the online weights as they are at the change, frozen from here on
                    path = Path(tmp) / "at-change.safetensors"
                    admin.export_model(path)
                    Admin(at_change.endpoints["control"]).import_model(path)
                for k, producer in producers.items():
                    forecasts[k] = producer.send(ids, x)
                if t > 0 and t % round_every == 0:
                    status = admin.train_now(wait=120)
                    rounds += 1
                    published += status["last_round"]["outcome"] == "published"
        finally:
            for producer in producers.values():
                producer.close()
            for daemon in (online, frozen, at_change):
                daemon.stop_and_join()
    elapsed = time.perf_counter() - started
    rows = []
    for lo, hi in blocks:
        sl = slice(change + lo, min(change + hi, ticks))
        rows.append(
            {
                "ticks": (lo, hi),
                "events": ((lo) * n, (min(change + hi, ticks) - change) * n),
                **{k: float(np.nanmean(v[sl])) for k, v in errors.items()},
            }
        )
    before = slice(max(1, change - blocks[0][1]), change)
    return {
        "label": label,
        "streams": n,
        "ticks": ticks,
        "change": change,
        "rounds": rounds,
        "published": published,
        "seconds": round(elapsed, 1),
        "before_change": {k: float(np.nanmean(v[before])) for k, v in errors.items()},
        "blocks": rows,
    }


def print_learning(result: dict) -> None:
    print(f"\n## {result['label']}")
    print(
        f"{result['streams']} stream(s), {result['ticks']} ticks, change at tick {result['change']}; "
        f"{result['rounds']} training rounds ({result['published']} published) in {result['seconds']} s"
    )
    bc = result["before_change"]
    print(f"just before the change: (a) {bc['a']:.4f}  (a') {bc['a_change']:.4f}  (b) {bc['b']:.4f}  (c) {bc['c']:.4f}")
    print(
        "| events after the change | (a) frozen initial | (a') frozen at change | (b) last value | (c) online "
        "| (c) <= (a)/2 | (c) < (b) |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in result["blocks"]:
        lo, hi = row["events"]
        print(
            f"| {lo:,}-{hi:,} | {row['a']:.4f} | {row['a_change']:.4f} | {row['b']:.4f} | {row['c']:.4f} | "
            f"{'yes' if row['c'] <= row['a'] / 2 else 'no'} | {'yes' if row['c'] < row['b'] else 'no'} |"
        )


def part_synthetic(args) -> dict:
    from lstmd.clients.workloads import PeriodicStreams

    workload = PeriodicStreams(args.streams, 2, seed=args.seed)
    ticks = 2 * args.half
    series = np.empty((ticks, args.streams, 2), np.float32)
    for t in range(ticks):
        if t == args.half:
            workload.shift()
        series[t] = workload.next()
    edges = [e for e in (0, 25, 50, 100, 200, 400, 800) if e < args.half] + [args.half]
    return run_learning(
        series,
        args.half,
        [
            "model.task=forecast",
            "model.input_size=2",
            "model.output_size=2",
            "model.hidden_size=32",
            f"model.seed={args.seed}",
            f"state.capacity={args.streams}",
        ],
        ["train.k2=16", "train.record_steps=64", "train.batch=64", "train.steps=20", "train.lr=0.003",
         *args.synthetic_set],  # fmt: skip
        args.round_every,
        list(zip(edges[:-1], edges[1:], strict=True)),
        f"synthetic: {args.streams} periodic streams, regime change half-way",
    )


def load_co2() -> np.ndarray:
    try:
        import statsmodels.api as sm
    except ImportError:
        sys.exit("the co2 part needs statsmodels: pip install statsmodels (or pip install -e '.[bench]')")
    data = sm.datasets.co2.load_pandas().data["co2"]
    return data.interpolate().bfill().to_numpy(np.float32)  # 59 missing weeks, filled linearly


def part_co2(args) -> dict:
    co2 = load_co2()
    series = co2[:, None, None]  # one stream, one feature
    half = len(co2) // 2
    quarter = (len(co2) - half) // 4
    return run_learning(
        series,
        half,
        [
            "model.task=forecast",
            "model.input_size=1",
            "model.output_size=1",
            "model.hidden_size=16",
            f"model.seed={args.seed}",
            "state.capacity=4",
        ],
        [
            "train.k2=16",
            "train.record_steps=512",  # ten years of weeks: one stream needs the history
            "train.holdout_windows=4",  # a year of weeks held out: one window of one stream is too noisy a check
            "train.batch=32",
            "train.steps=5",  # 20 steps per round on so few windows overfits (0.41 vs 0.37 after the change)
            "train.lr=0.003",
            "train.min_windows=1",
            *args.co2_set,
        ],
        args.co2_round_every,
        [(0, quarter), (quarter, 2 * quarter), (2 * quarter, 3 * quarter), (3 * quarter, 4 * quarter + 1)],
        "co2: weekly Mauna Loa CO2 (statsmodels.datasets.co2), 1958-2001, second half",
    )


# ---- part 4: a suite of real series as streams of one daemon ------------------------------------------------

# (name, loader, season): public series that ship inside statsmodels (no downloads at run time); season: the
# seasonal-naive forecast's lag where the series has one.
SUITE = (
    ("co2 weekly", lambda d: d.co2.load_pandas().data["co2"].interpolate().bfill(), 52),
    ("sunspots yearly", lambda d: d.sunspots.load_pandas().data["SUNACTIVITY"], 11),
    ("nile yearly", lambda d: d.nile.load_pandas().data["volume"], None),
    ("elnino monthly", lambda d: d.elnino.load_pandas().data.iloc[:, 1:].stack(), 12),
    ("us real gdp quarterly", lambda d: d.macrodata.load_pandas().data["realgdp"], None),
    ("us cpi quarterly", lambda d: d.macrodata.load_pandas().data["cpi"], None),
    ("us unemployment quarterly", lambda d: d.macrodata.load_pandas().data["unemp"], None),
    ("us t-bill rate quarterly", lambda d: d.macrodata.load_pandas().data["tbilrate"], None),
)


def load_suite() -> list[tuple[str, np.ndarray, int | None]]:
    """Each series standardised on its first quarter (as a user would before going live), float32."""
    try:
        import statsmodels.api as sm
    except ImportError:
        sys.exit("the suite needs statsmodels: pip install statsmodels (or pip install -e '.[bench]')")
    out = []
    for name, load, season in SUITE:
        x = np.asarray(load(sm.datasets), np.float64)
        q = x[: len(x) // 4]
        out.append((name, ((x - q.mean()) / q.std()).astype(np.float32), season))
    return out


def run_suite_daemons(suite, model: list[str], train: list[str], round_every: int, dump: str | None = None) -> dict:
    """Every series is one stream of the same daemons (trained and frozen): one event per series per tick, a
    training round every `round_every` ticks. Returns each stream's one-step forecasts [len] (NaN: none)."""
    from lstmd.clients import Admin, Producer

    n, ticks = len(suite), max(len(x) for _, x, _ in suite)
    forecasts = {k: [np.full(len(x), np.nan, np.float32) for _, x, _ in suite] for k in ("trained", "frozen")}
    model = [*model, f"state.capacity={max(4, n)}"]
    rounds = published = 0
    dumped: list[np.ndarray] = []
    with tempfile.TemporaryDirectory(prefix="lstmd-suite-") as tmp:
        daemons = {
            "trained": start_daemon(Path(tmp) / "t", [*model, "train.enabled=true", "train.interval=0", *train]),
            "frozen": start_daemon(Path(tmp) / "f", model),
        }
        admin = Admin(daemons["trained"].endpoints["control"])
        producers = {k: Producer(d.endpoints["events"]) for k, d in daemons.items()}
        started = time.perf_counter()
        try:
            for t in range(ticks):
                ids = [i for i, (_, x, _) in enumerate(suite) if t < len(x)]
                events = np.array([[suite[i][1][t]] for i in ids], np.float32)
                for k, producer in producers.items():
                    pred = producer.send(ids, events)
                    for j, i in enumerate(ids):
                        if t + 1 < len(suite[i][1]):
                            forecasts[k][i][t + 1] = pred[j, 0]
                if dump is not None:  # the trained daemon's rows after the step (the loop is idle until the next send)
                    store = daemons["trained"].store
                    row = np.full((n, store.adaptation.shape[1]), np.nan, np.float32)
                    row[ids] = store.adaptation[[store.slot_of[i] for i in ids]].numpy()
                    dumped.append(row)
                if t > 0 and t % round_every == 0:
                    status = admin.train_now(wait=120)
                    rounds += 1
                    published += status["last_round"]["outcome"] == "published"
            guard = admin.train_status().get("guard")
            if dump is not None:
                np.save(dump, np.stack(dumped))
        finally:
            for producer in producers.values():
                producer.close()
            for daemon in daemons.values():
                daemon.stop_and_join()
    return {"forecasts": forecasts, "rounds": rounds, "published": published, "guard": guard,
            "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def deep_river_forecasts(python: str, suite) -> list[np.ndarray]:
    """deep-river's RollingRegressor with an LSTM (its own virtual environment: `python`), one model per series,
    fed the series' change and predicting the next change (the same idea lstmd uses; fed levels it does worse)."""
    with tempfile.TemporaryDirectory(prefix="lstmd-deep-river-") as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(src, *[x for _, x, _ in suite])
        subprocess.run([python, __file__, "--deep-river-worker", str(src), str(dst)], check=True)
        with np.load(dst) as out:
            return [out[f"arr_{i}"] for i in range(len(suite))]


def deep_river_worker(src: str, dst: str) -> None:
    """Runs inside deep-river's environment: one-step forecasts of every series in `src`, written to `dst`."""
    import torch
    from deep_river.regression import RollingRegressor

    class LstmModule(torch.nn.Module):
        def __init__(self, n_features: int, hidden_size: int = 16):
            super().__init__()
            self.lstm = torch.nn.LSTM(n_features, hidden_size, num_layers=1)
            self.head = torch.nn.Linear(hidden_size, 1)

        def forward(self, x):
            out, _ = self.lstm(x)  # [window, batch, features] (deep-river's rolling layout)
            return self.head(out[-1])

    torch.manual_seed(0)
    results = []
    with np.load(src) as data:
        for key in sorted(data.files, key=lambda k: int(k.split("_")[1])):
            x = data[key].astype(np.float64)
            model = RollingRegressor(
                module=LstmModule(1), loss_fn="mse", optimizer_fn="adam", window_size=30, lr=1e-3, seed=0
            )
            pred = np.full(len(x), np.nan, np.float32)
            for t in range(1, len(x) - 1):
                features = {"change": float(x[t] - x[t - 1])}
                pred[t + 1] = x[t] + float(model.predict_one(features))
                model.learn_one(features, float(x[t + 1] - x[t]))
            results.append(pred)
    np.savez(dst, *results)


def part_suite(args) -> dict:
    suite = load_suite()
    model = ["model.task=forecast", "model.input_size=1", "model.output_size=1",
             f"model.hidden_size={args.suite_hidden}", f"model.seed={args.seed}"]  # fmt: skip
    # The daemon's defaults (the guard's level regressor, train.level_rate = 0.1, included), but a round may run from
    # the first complete window: these series are short. --suite-set train.level_rate=0 measures them without the
    # level.
    train = ["train.min_windows=1", *args.suite_set]
    run = run_suite_daemons(suite, model, train, args.suite_round_every, args.suite_dump)
    deep = deep_river_forecasts(args.deep_river_python, suite) if args.deep_river_python else None
    rows = []

    def mae(forecast: np.ndarray, x: np.ndarray) -> float:  # over the second half
        return float(np.nanmean(np.abs(forecast[len(x) // 2 :] - x[len(x) // 2 :])))

    for i, (name, x, season) in enumerate(suite):
        mae_x = lambda f, x=x: mae(f, x)  # noqa: E731
        last = np.concatenate([[np.nan], x[:-1]])
        row = {"series": name, "events": len(x), "last_value": mae_x(last)}
        if season:
            row["seasonal_naive"] = mae_x(np.concatenate([np.full(season, np.nan), x[:-season]]))
        row["frozen"] = mae_x(run["forecasts"]["frozen"][i])
        row["trained"] = mae_x(run["forecasts"]["trained"][i])
        if deep is not None:
            row["deep_river"] = mae_x(deep[i])
        rows.append(row)
    geo = lambda key: float(np.exp(np.mean([np.log(r[key] / r["last_value"]) for r in rows])))  # noqa: E731
    means = {k: geo(k) for k in ("frozen", "trained", "deep_river") if k in rows[0]}
    kept = {k: run[k] for k in ("rounds", "published", "seconds", "guard")}
    return {"rows": rows, "geomean_vs_last_value": means, "model": model, "train": train,
            "round_every": args.suite_round_every, **kept}  # fmt: skip


def print_suite(result: dict) -> None:
    rows = result["rows"]
    deep = "deep_river" in rows[0]
    print(f"\n## suite: {len(rows)} real series as streams of one daemon (mean absolute one-step error, second half)")
    print(f"{' '.join(result['model'][1:])}; {' '.join(result['train'])}; a round every {result['round_every']} ticks: "
          f"{result['rounds']} rounds, {result['published']} published, {result['seconds']} s; guard {result['guard']}")
    head = "| series | events | last value | seasonal naive | frozen | trained | trained / last | trained <= frozen |"
    print(head + (" deep-river | trained / deep-river |" if deep else ""))
    print("|---" * (head.count("|") - 1 + (2 if deep else 0)) + "|")
    for r in rows:
        sn = f"{r['seasonal_naive']:.4f}" if "seasonal_naive" in r else "-"
        line = (f"| {r['series']} | {r['events']} | {r['last_value']:.4f} | {sn} | {r['frozen']:.4f} | "
                f"{r['trained']:.4f} | {r['trained'] / r['last_value']:.3f} | "
                f"{'yes' if r['trained'] <= r['frozen'] else 'no'} |")  # fmt: skip
        if deep:
            line += f" {r['deep_river']:.4f} | {r['trained'] / r['deep_river']:.3f} |"
        print(line)
    print("geometric mean over the suite, / last value: "
          + ", ".join(f"{k} {v:.3f}" for k, v in result["geomean_vs_last_value"].items()))  # fmt: skip


def _step_wave(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """One wave of `n` streams for timing Engine.step (parts guard and level-cost): 64 steps of 8 features to
    cycle through, the streams' slots among 2n, none fresh, and the steps per timed block (a few ms)."""
    rng = np.random.default_rng(0)
    # Random walks, cycled: a constant input would drive the guard's averages of a zero target into subnormal
    # floats, which cost ~100x per operation (a stream stuck at one value for thousands of events would too).
    walk = np.cumsum(rng.standard_normal((64, n, 8)), axis=0).astype(np.float32)
    slots = rng.choice(2 * n, n, replace=False).astype(np.int64)
    return walk, slots, np.zeros(n, bool), max(5, 20_000 // n)


def _rotating_times(modes: tuple[str, ...], timed, repeats: int) -> dict[str, list[float]]:
    """mode -> `repeats` results of timed(mode), after one warm-up each, the modes in rotating order per round
    (so a drift of the machine's load hits every mode alike)."""
    for mode in modes:
        timed(mode)
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    for r in range(repeats):
        for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
            seconds[mode].append(timed(mode))
    return seconds


def part_guard(args) -> dict:
    """The guard's cost in the serving step, as a same-run A/B: Engine.step of a forecast model (I = O = 8, H = 64,
    one wave of `--guard-batch` streams on the CPU, one torch thread, the default backend) with the per-stream
    adaptation (scale and guard) fused into the C step's pass, the same with the level regressor (train.level_rate
    = 0.1: the default for these models; an engine of its own, its rows are wider), the adaptation as torch ops (as
    served where the C extension was not built, on CUDA and with a season), and off: train.guard = false
    (Engine.guard), the LSTM sees the change in the model's one scale and the reply is the last value plus the scaled
    change (the last-event bookkeeping stays). Short blocks of steps in rotating order; per round (on - off) / on
    for each "on"; median and the 10th-90th percentile range over rounds. An upper bound for its share of serving
    throughput: the step is most, not all, of what an event costs."""
    import torch
    from lstmd.daemon.engine import Engine
    from lstmd.daemon.model import ModelSpec, ServingModel
    from lstmd.daemon.state_store import StateStore

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    spec = ModelSpec(8, 64, 1, 8, "forecast", ())
    modes = ("fused", "fused_level", "torch", "off")
    results = []
    for n in args.guard_batch:
        engine = Engine(ServingModel.initial(spec, 0), StateStore(1, 64, 4 * n, cpu), cpu, "auto")
        leveled = Engine(ServingModel.initial(spec, 0), StateStore(1, 64, 4 * n, cpu), cpu, "auto", level=0.1)
        fused = engine._fused_adaptation
        walk, slots, fresh, block = _step_wave(n)

        def timed(mode: str, engines=(engine, leveled), walk=walk, slots=slots, fresh=fresh, block=block,
                  fused=fused) -> float:  # fmt: skip
            engine = engines[mode == "fused_level"]
            engine.guard = mode != "off"
            engine._fused_adaptation = fused and mode.startswith("fused")
            t0 = time.perf_counter()
            for i in range(block):
                engine.step(walk[i % 64], slots, fresh)
            return (time.perf_counter() - t0) / block

        try:
            seconds = _rotating_times(modes, timed, args.guard_repeats)
        finally:
            engine.close()
            leveled.close()
        off = np.array(seconds["off"])
        row = {"batch": n, "rounds": args.guard_repeats, "steps_per_block": block,
               "step_us_off": float(np.median(off)) * 1e6}  # fmt: skip
        for mode in ("fused", "fused_level", "torch"):
            on = np.array(seconds[mode])
            p10, p50, p90 = np.percentile((on - off) / on, [10, 50, 90])
            row[mode] = {"step_us": float(np.median(on)) * 1e6, "share_median": p50, "share_p10": p10, "share_p90": p90}
        results.append(row)
    return {"runs": results, "load_avg_1m": os.getloadavg()[0]}


def print_guard(result: dict) -> None:
    print(f"\n## the guard's cost (A/B/C/D in rotating order), load average {result['load_avg_1m']:.1f}")
    modes = (("fused", "fused"), ("fused_level", "fused + level"), ("torch", "torch ops"))
    print("| events per step | step, off (us) | " + " | ".join(f"{label}: step (us) | {label}: share, median (p10 to "
                                                         f"p90)" for _, label in modes) + " |")  # fmt: skip
    print("|---" * (2 + 2 * len(modes)) + "|")
    for r in result["runs"]:
        cells = [f"{r[m]['step_us']:.0f} | {100 * r[m]['share_median']:.1f}% ({100 * r[m]['share_p10']:.1f}% to "
                 f"{100 * r[m]['share_p90']:.1f}%)" for m, _ in modes]  # fmt: skip
        print(f"| {r['batch']} | {r['step_us_off']:.0f} | " + " | ".join(cells) + " |")


BOUND_MODELS = (("ARIMA(0,1,1) (SES, local level)", (0, 1, 1), "n"), ("ARIMA(1,1,0)", (1, 1, 0), "n"),
                ("ARIMA(2,1,2)", (2, 1, 2), "n"), ("ARMA(1,1) + mean", (1, 0, 1), "c"),
                ("ARIMA(0,2,2) (Holt, local trend)", (0, 2, 2), "n"), ("ARIMA(1,2,1)", (1, 2, 1), "n"))  # fmt: skip
SEASONAL_BOUND = "SARIMA(1,0,1)(1,1,1,s)"  # for the series whose season is at most MAX_SARIMA_SEASON
MAX_SARIMA_SEASON = 12  # CO2's 52-week season makes a seasonal state space of ~110 states: minutes per fit
RLS_BOUND = "online linear (RLS), best of grid"
RLS_GRID = [(k, forget, years) for k in (1, 2, 4, 8, 12) for forget in (0.98, 0.995, 1.0) for years in (0, 1, 2, 4)]


def rls_forecast(x: np.ndarray, lags: int, forget: float, season: int | None, years: int) -> np.ndarray:
    """One-step forecasts of x by recursive least squares, online from the first event (no offline fit): the next
    change regressed on the last `lags` changes, the same phase's change `years` seasons back (with a season) and
    a constant, with exponential forgetting `forget` (1: none)."""
    d = np.diff(x)
    years = years if season else 0
    width = lags + years + 1
    P, w = np.eye(width) * 100.0, np.zeros(width)
    out = np.full(len(x), np.nan)
    for t in range(max(lags, (season or 0) * years), len(x) - 1):  # x[t] known: the changes up to d[t - 1]
        phi = np.concatenate([d[t - lags : t][::-1], [d[t - j * season] for j in range(1, years + 1)], [1.0]])
        out[t + 1] = x[t] + phi @ w
        Pphi = P @ phi
        gain = Pphi / (forget + phi @ Pphi)
        w = w + gain * (d[t] - phi @ w)
        P = (P - np.outer(gain, Pphi)) / forget
    return out


def part_bounds(args) -> dict:
    """What classical one-step forecasters reach on the suite's series (mean absolute error over the second half /
    the last value's, as the suite scores): each model fitted by maximum likelihood on the series' first half, then
    filtered over the whole series with those parameters (what an offline fit before going live gives), and fitted
    on the whole series (hindsight: an optimistic reference, not a forecaster); a seasonal ARIMA where the season is
    short; and an online linear regression of the next change on recent (and seasonal) changes by recursive least
    squares, the best of RLS_GRID per series (a choice made in hindsight: optimistic too). Where these stay above
    0.8x deep-river's error, that target asks for more than these models give."""
    import warnings

    from statsmodels.tsa.statespace.sarimax import SARIMAX

    rows = []
    for name, x, season in load_suite():
        x = x.astype(np.float64)
        half = len(x) // 2
        naive = float(np.abs(x[half:] - x[half - 1 : -1]).mean())
        score = lambda f, x=x, half=half, naive=naive: float(np.abs(np.asarray(f)[half:] - x[half:]).mean()) / naive  # noqa: E731
        row = {"series": name}
        models = [(label, order, trend, (0, 0, 0, 0)) for label, order, trend in BOUND_MODELS]
        if season and season <= MAX_SARIMA_SEASON:
            models.append((SEASONAL_BOUND, (1, 0, 1), "n", (1, 1, 1, season)))
        for label, order, trend, seasonal in models:
            with warnings.catch_warnings():  # convergence chatter of short series; the errors are what counts
                warnings.simplefilter("ignore")
                early = SARIMAX(x[:half], order=order, seasonal_order=seasonal, trend=trend).fit(disp=False)
                filtered = early.apply(x).predict()
                hindsight = SARIMAX(x, order=order, seasonal_order=seasonal, trend=trend).fit(disp=False).predict()
            row[label] = [score(filtered), score(hindsight)]
        grid = [(lags, forget, years) for lags, forget, years in RLS_GRID if season or not years]
        error, (lags, forget, years) = min((score(rls_forecast(x, g[0], g[1], season, g[2])), g) for g in grid)
        row[RLS_BOUND] = [error, error]
        row["rls_choice"] = {"lags": lags, "forget": forget, "seasons_back": years}
        rows.append(row)
    return {"rows": rows}


def print_bounds(result: dict) -> None:
    print("\n## classical one-step forecasters, error / last value's (fitted on the first half; on the whole series)")
    labels = [label for label, _, _ in BOUND_MODELS] + [SEASONAL_BOUND, RLS_BOUND]
    print("| series | " + " | ".join(labels) + " | best |")
    print("|---" * (len(labels) + 2) + "|")
    for r in result["rows"]:
        cells = [f"{r[k][0]:.3f} ({r[k][1]:.3f})" if k in r else "-" for k in labels[:-1]]
        cells.append(f"{r[RLS_BOUND][0]:.3f} ({r['rls_choice']})")
        best = min((r[k][0], k) for k in labels if k in r)
        print(f"| {r['series']} | " + " | ".join(cells) + f" | {best[0]:.3f} {best[1]} |")


def part_level_cost(args) -> dict:
    """What the level regressor (train.level_rate) costs in the serving step: Engine.step of the same forecast model
    and wave as part 5, with the adaptation fused in C without and with the level (what the CPU serves with), and
    as torch ops without and with it (as served on CUDA), one engine each, blocks in rotating order; medians over
    rounds of each block's time per step."""
    import torch
    from lstmd.daemon.engine import Engine
    from lstmd.daemon.model import ModelSpec, ServingModel
    from lstmd.daemon.state_store import StateStore

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    spec = ModelSpec(8, 64, 1, 8, "forecast", ())
    modes = ("fused", "fused_level", "torch", "torch_level")
    results = []
    for n in args.guard_batch:
        engines = {m: Engine(ServingModel.initial(spec, 0), StateStore(1, 64, 4 * n, cpu), cpu, "auto",
                             level=0.1 if m.endswith("level") else 0.0) for m in modes}  # fmt: skip
        for m in ("torch", "torch_level"):  # the torch-ops path, as served on CUDA
            engines[m]._fused_adaptation = False
        walk, slots, fresh, block = _step_wave(n)

        def timed(mode: str, walk=walk, slots=slots, fresh=fresh, block=block, engines=engines) -> float:
            t0 = time.perf_counter()
            for i in range(block):
                engines[mode].step(walk[i % 64], slots, fresh)
            return (time.perf_counter() - t0) / block

        seconds = _rotating_times(modes, timed, args.guard_repeats)
        results.append({"batch": n, "rounds": args.guard_repeats,
                        **{f"step_us_{m}": float(np.median(v)) * 1e6 for m, v in seconds.items()}})  # fmt: skip
    return {"runs": results, "load_avg_1m": os.getloadavg()[0]}


def print_level_cost(result: dict) -> None:
    print(f"\n## the level regressor's cost in Engine.step (rotating order), load average {result['load_avg_1m']:.1f}")
    print("| events per step | fused, no level (us) | fused + level (us) | fused: level / none | torch ops, no level "
          "(us) | torch ops + level (us) |")
    print("|---|---|---|---|---|---|")
    for r in result["runs"]:
        fused, level = r["step_us_fused"], r["step_us_fused_level"]
        print(f"| {r['batch']} | {fused:.0f} | {level:.0f} | {level / fused:.3f} | {r['step_us_torch']:.0f} | "
              f"{r['step_us_torch_level']:.0f} |")


# ---- part 3: latency --------------------------------------------------------------------------------------


def _latencies(producer, ids, rng, seconds: float) -> np.ndarray:
    out = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        x = rng.standard_normal((len(ids), 2)).astype(np.float32)
        t0 = time.perf_counter()
        producer.send(ids, x)
        out.append(time.perf_counter() - t0)
    return np.array(out)


def part_latency(args) -> dict:
    from lstmd.clients import Admin, Producer
    from lstmd.clients.bench import free_tcp_port

    events, control = f"tcp://127.0.0.1:{free_tcp_port()}", f"tcp://127.0.0.1:{free_tcp_port()}"
    results = {}
    for threads in args.threads:
        with tempfile.TemporaryDirectory(prefix="lstmd-latency-") as tmp:
            cmd = [
                sys.executable,
                "-m",
                "lstmd.clients.cli",
                "serve",
                "--log-level",
                "warning",
                "--set",
                f"serve.events={events}",
                "--set",
                f"serve.control={control}",
                "--set",
                "serve.publish=",
                "--set",
                "serve.metrics=",
                "--set",
                "serve.device=cpu",
                "--set",
                f"state.dir={tmp}",
                "--set",
                "model.task=forecast",
                "--set",
                "model.input_size=2",
                "--set",
                "model.output_size=2",
                "--set",
                "model.hidden_size=32",
                "--set",
                "train.enabled=true",
                "--set",
                "train.interval=0",
                "--set",
                "train.k2=16",
                "--set",
                "train.record_steps=64",
                "--set",
                f"train.threads={threads}",
            ]
            proc = subprocess.Popen(cmd)
            try:
                admin = Admin(control, timeout=60)
                deadline = time.monotonic() + 60
                while True:
                    try:
                        admin.status()
                        break
                    except TimeoutError:
                        if time.monotonic() > deadline:
                            raise
                ids = list(range(args.latency_streams))
                rng = np.random.default_rng(0)
                with Producer(events) as producer:
                    _latencies(producer, ids, rng, 2.0)  # warm up and fill the recorder
                    idle = _latencies(producer, ids, rng, args.latency_seconds)
                    # Rounds back to back: ask for far more than can finish while we measure.
                    for _ in range(1000):
                        admin.call("train_now")
                    time.sleep(0.2)
                    rounds_before = admin.train_status()["rounds"]
                    busy = _latencies(producer, ids, rng, args.latency_seconds)
                    status = admin.train_status()
                    admin.train_pause()
                rounds = status["rounds"] - rounds_before
                last = status["last_round"] or {}
            finally:
                proc.terminate()
                proc.wait(30)
        q = lambda a, p: float(np.percentile(a, p) * 1e3)  # noqa: E731
        results[threads] = {
            "idle_p50_ms": q(idle, 50),
            "idle_p99_ms": q(idle, 99),
            "training_p50_ms": q(busy, 50),
            "training_p99_ms": q(busy, 99),
            "rounds_during": rounds,
            "round_s": last.get("duration_s"),
            "sends_idle": len(idle),
            "sends_training": len(busy),
        }
    return {"streams_per_message": args.latency_streams, "by_threads": results}


def print_latency(result: dict) -> None:
    print(f"\n## latency: {result['streams_per_message']} events per message, reply round trip (client side)")
    print(
        "| train.threads | idle p50 | idle p99 | training p50 | training p99 | p50 ratio | p99 ratio | rounds | round |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for threads, r in result["by_threads"].items():
        print(
            f"| {threads} | {r['idle_p50_ms']:.2f} ms | {r['idle_p99_ms']:.2f} ms | {r['training_p50_ms']:.2f} ms | "
            f"{r['training_p99_ms']:.2f} ms | {r['training_p50_ms'] / r['idle_p50_ms']:.2f}x | "
            f"{r['training_p99_ms'] / r['idle_p99_ms']:.2f}x | {r['rounds_during']} | {r['round_s']} s |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = ["all", "synthetic", "co2", "latency", "suite", "guard", "level-cost", "bounds"]
    parser.add_argument("--part", choices=parts, default="all")
    parser.add_argument("--streams", type=int, default=200, help="synthetic streams")
    parser.add_argument("--half", type=int, default=1200, help="synthetic ticks before (and after) the change")
    parser.add_argument("--round-every", type=int, default=20, help="synthetic: ticks between training rounds")
    parser.add_argument("--co2-round-every", type=int, default=13, help="co2: weeks between training rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic-set", nargs="*", default=[], help="extra config overrides for the synthetic part")
    parser.add_argument("--co2-set", nargs="*", default=[], help="extra config overrides for the co2 part")
    parser.add_argument("--latency-streams", type=int, default=100)
    parser.add_argument("--latency-seconds", type=float, default=8.0)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="train.threads settings to time")
    parser.add_argument("--suite-dump", help="suite: save the trained daemon's adaptation rows after every tick "
                        "[ticks, series, width] (.npy), to replay the guard offline")
    parser.add_argument("--suite-set", nargs="*", default=[], help="config overrides for the suite's trained daemon")
    parser.add_argument("--suite-round-every", type=int, default=8, help="suite: ticks between training rounds")
    parser.add_argument("--suite-hidden", type=int, default=32, help="suite: model.hidden_size")
    parser.add_argument(
        "--deep-river-python",
        default=os.environ.get("LSTMD_DEEP_RIVER_PYTHON"),
        help="suite: a Python with deep-river installed (its own venv: its torch pin); unset: no deep-river column",
    )
    parser.add_argument("--guard-batch", type=int, nargs="+", default=[100, 1000, 5000], help="guard: events per step")
    parser.add_argument("--guard-repeats", type=int, default=200, help="guard: interleaved pairs of blocks timed")
    parser.add_argument("--deep-river-worker", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.deep_river_worker:
        deep_river_worker(*args.deep_river_worker)
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    print(
        f"# lstmd learning benchmark: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPU cores"
    )
    results = {}
    if args.part in ("all", "synthetic"):
        results["synthetic"] = part_synthetic(args)
        print_learning(results["synthetic"])
    if args.part in ("all", "co2"):
        results["co2"] = part_co2(args)
        print_learning(results["co2"])
    if args.part in ("all", "suite"):
        results["suite"] = part_suite(args)
        print_suite(results["suite"])
    if args.part in ("all", "guard"):
        results["guard"] = part_guard(args)
        print_guard(results["guard"])
    if args.part == "bounds":  # not in "all": a reference for the suite, not a measurement of lstmd
        results["bounds"] = part_bounds(args)
        print_bounds(results["bounds"])
    if args.part == "level-cost":  # not in "all": part 5 times the guard itself
        results["level_cost"] = part_level_cost(args)
        print_level_cost(results["level_cost"])
    if args.part in ("all", "latency"):
        results["latency"] = part_latency(args)
        print_latency(results["latency"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
