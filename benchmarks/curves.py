"""Scaling curves: end-to-end throughput vs streams (1k → 1M) and vs hidden size (32 → 512), memory per stream.

Each point is one `lstmd bench` run (a fresh `lstmd serve` subprocess, the same producers, the same counting;
see lstmd.clients.bench); the hidden-size sweep also runs the naive per-event server at every H. Writes
docs/bench-curves.json, docs/bench-streams.png, docs/bench-hidden.png and prints markdown tables.

    python benchmarks/curves.py [--duration 5] [--streams 1000,10000,100000,1000000] [--hidden 32,64,...]

Memory per stream = (peak RSS − RSS before the first event) / streams: the state rows the streams touched plus
the id → slot dict entries; the per-slot numpy bookkeeping is allocated for the whole capacity at start.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

from lstmd.clients.bench import Workload, run_lstmd, run_naive, summarize

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def sweep_streams(counts: list[int], duration: float, base: Workload) -> list[dict]:
    rows = []
    for streams in counts:
        # Warm-up long enough that every stream has been admitted before the window (1M streams: 1,000
        # messages of 1,000 events).
        warmup = max(base.warmup_s, streams / 150_000)
        w = Workload(**{**asdict(base), "streams": streams, "duration_s": duration, "warmup_s": warmup})
        r = run_lstmd(w)
        rows.append(
            {
                "streams": streams,
                "events_per_s": r.events_per_s,
                "p50_ms": r.latency_ms["p50"],
                "p99_ms": r.latency_ms["p99"],
                "rss_mib": r.server_rss_mib,
                "rss_start_mib": r.server_rss_start_mib,
                "state_bytes_per_stream": 2 * w.num_layers * w.hidden_size * 4,
                "batch_mean": r.batch_mean,
                "errors": r.errors,
            }
        )
        print(rows[-1], flush=True)
    return marginal_memory(rows)


def marginal_memory(rows: list[dict]) -> list[dict]:
    """Bytes per stream = (peak RSS − the smallest run's peak RSS) / (streams − its streams).

    Each run's capacity equals its stream count, so this includes everything a slot costs: the state rows, the
    numpy bookkeeping, the id → slot dict entry and the id object.
    """
    base = min(rows, key=lambda r: r["streams"])
    for r in rows:
        extra = r["streams"] - base["streams"]
        r["bytes_per_stream"] = round((r["rss_mib"] - base["rss_mib"]) * 2**20 / extra, 1) if extra else None
    return rows


def sweep_hidden(sizes: list[int], duration: float, naive_duration: float, base: Workload) -> list[dict]:
    rows = []
    for hidden in sizes:
        w = Workload(**{**asdict(base), "hidden_size": hidden, "duration_s": duration})
        r = run_lstmd(w)
        n = run_naive(Workload(**{**asdict(w), "duration_s": naive_duration}))
        rows.append(
            {
                "hidden": hidden,
                "events_per_s": r.events_per_s,
                "naive_events_per_s": n.events_per_s,
                "speedup": round(r.events_per_s / max(n.events_per_s, 1e-9), 1),
                "p50_ms": r.latency_ms["p50"],
                "p99_ms": r.latency_ms["p99"],
                "rss_mib": r.server_rss_mib,
                "batch_mean": r.batch_mean,
                "errors": r.errors + n.errors,
            }
        )
        print(rows[-1], flush=True)
    return rows


def plot(streams_rows: list[dict], hidden_rows: list[dict], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if streams_rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r["streams"] for r in streams_rows]
        ax.plot(xs, [r["events_per_s"] for r in streams_rows], "o-", label="lstmd events/s")
        ax.set_xscale("log")
        ax.set_xlabel("streams")
        ax.set_ylabel("events/s (end to end)")
        ax.set_ylim(bottom=0)
        ax2 = ax.twinx()
        ax2.plot(xs, [r["rss_mib"] for r in streams_rows], "s--", color="tab:red", label="daemon RSS MiB")
        ax2.set_ylabel("peak RSS (MiB)")
        ax2.set_ylim(bottom=0)
        ax.set_title("lstmd: throughput and memory vs streams (H=64, I=8, L=1)")
        fig.legend(loc="center", bbox_to_anchor=(0.5, 0.5))
        fig.tight_layout()
        fig.savefig(out_dir / "bench-streams.png", dpi=120)
        plt.close(fig)
    if hidden_rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r["hidden"] for r in hidden_rows]
        ax.plot(xs, [r["events_per_s"] for r in hidden_rows], "o-", label="lstmd")
        ax.plot(xs, [r["naive_events_per_s"] for r in hidden_rows], "s--", label="naive per-event server")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("hidden size H")
        ax.set_ylabel("events/s (end to end)")
        ax.set_title("lstmd vs naive: throughput vs H (10,000 streams, I=8, L=1)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "bench-hidden.png", dpi=120)
        plt.close(fig)


def markdown(streams_rows: list[dict], hidden_rows: list[dict]) -> str:
    lines = []
    if streams_rows:
        lines += [
            "| streams | events/s | p50 ms | p99 ms | peak RSS MiB | bytes/stream (marginal) "
            "| of which state (2·L·H·4) | mean batch |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in streams_rows:
            per_stream = "-" if r["bytes_per_stream"] is None else format(r["bytes_per_stream"], ",.0f")
            lines.append(
                f"| {r['streams']:,} | {r['events_per_s']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
                f"| {r['rss_mib']:,.0f} | {per_stream} "
                f"| {r['state_bytes_per_stream']} | {r['batch_mean'] or 0:,.0f} |"
            )
        lines.append("")
    if hidden_rows:
        lines += [
            "| H | lstmd events/s | naive events/s | ratio | p50 ms | p99 ms | peak RSS MiB |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in hidden_rows:
            lines.append(
                f"| {r['hidden']} | {r['events_per_s']:,.0f} | {r['naive_events_per_s']:,.0f} | {r['speedup']:,.0f}x "
                f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['rss_mib']:,.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--naive-duration", type=float, default=3.0)
    parser.add_argument("--streams", type=_ints, default=[1000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--hidden", type=_ints, default=[32, 64, 128, 256, 512])
    parser.add_argument("--events-per-message", type=int, default=1000)
    parser.add_argument("--inflight", type=int, default=Workload.inflight)
    parser.add_argument("--out", type=Path, default=DOCS)
    parser.add_argument("--from-json", type=Path, help="Redraw plots and tables from a saved run, no measuring.")
    args = parser.parse_args()
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        plot(marginal_memory(data["streams"]), data["hidden"], args.out)
        print(markdown(data["streams"], data["hidden"]))
        return
    base = Workload(events_per_message=args.events_per_message, inflight=args.inflight, warmup_s=2.0)
    streams_rows = sweep_streams(args.streams, args.duration, base)
    hidden_rows = sweep_hidden(args.hidden, args.duration, args.naive_duration, base)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = summarize([])["machine"]
    data = {"machine": machine, "load_avg_1m_end": round(os.getloadavg()[0], 2), "streams": streams_rows}
    data["hidden"] = hidden_rows
    (args.out / "bench-curves.json").write_text(json.dumps(data, indent=2) + "\n")
    plot(streams_rows, hidden_rows, args.out)
    print(markdown(streams_rows, hidden_rows))


if __name__ == "__main__":
    main()
