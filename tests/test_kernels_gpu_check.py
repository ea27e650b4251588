"""scripts/gpu-check's plumbing without a GPU: the script parses, and scripts/gpu-report turns made-up results
of every step into the summary table, gpu-check.json and the docs table (the first GPU run depends on it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu-check")], check=True)


def _bench_json(events_per_s: float, p99: float, half: bool = False, half_p99: float | None = None) -> dict:
    run = {"server": "lstmd", "events_per_s": events_per_s, "latency_ms": {"p50": 1.0, "p99": p99},
           "batch_mean": 4096.0, "errors": 0}  # fmt: skip
    at_half = {**run, "server": "lstmd@50%", "events_per_s": events_per_s / 2,
               "latency_ms": {"p50": 1.0, "p99": p99 if half_p99 is None else half_p99}}  # fmt: skip
    runs = [run] + ([at_half] if half else [])
    return {"date": "2026-11-27T00:00:00Z", "runs": runs}


def test_gpu_report_collects_and_writes_the_docs_table(tmp_path):
    (tmp_path / "gpu.txt").write_text("NVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04;torch 2.11.0;\n")
    kernels = {
        "date": "2026-11-27T00:00:00Z", "copy_gbps": 3000.0,
        "rows": [{"op": "step", "shape": "B=4096 H=256 L=1 I=64 S=1e6", "impl": "triton tiled 64x32 (auto)",
                  "ms": 0.05, "GB/s": 400.0, "% HBM": 13.3, "speedup": 3.5}],
        "targets": [{"target": "step B=4096 H=256 >= 3x torch eager", "measured": "3.50x", "met": True}],
    }  # fmt: skip
    (tmp_path / "kernels.json").write_text(json.dumps(kernels))
    (tmp_path / "lstmd-H256-100000-serve.json").write_text(json.dumps(_bench_json(5.5e6, 8.0)))
    (tmp_path / "lstmd-H256-100000-serve-half.json").write_text(json.dumps(_bench_json(5.2e6, 12.5, half=True)))
    (tmp_path / "lstmd-H256-100000-serve-nographs.json").write_text(json.dumps(_bench_json(2e6, 9.0)))
    (tmp_path / "lstmd-H64-10000-train.json").write_text(json.dumps(_bench_json(3e6, 4.0)))
    # a regression model (the graph-captured device step): the half-rate target takes the better of the two
    (tmp_path / "lstmd-H256-100000-serve-regression-half.json").write_text(
        json.dumps(_bench_json(4e6, 14.0, half=True, half_p99=7.5))
    )
    (tmp_path / "steps.tsv").write_text("CUDA tests\tpass: 120 passed\t95\nkernel sweep\tpass\t70\n")
    script = str(ROOT / "scripts" / "gpu-report")
    proc = subprocess.run([sys.executable, script, "collect", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "MET  >= 5M events/s, H=256, 100k streams: 5,500,000" in proc.stdout, proc.stdout
    assert "MET  p99 <= 10 ms at half that rate: 7.5 ms" in proc.stdout
    assert "H=256 100k forecast serve no-graphs lstmd" in proc.stdout
    assert "H=64 10k forecast train lstmd" in proc.stdout and "H=256 100k regression serve lstmd@50%" in proc.stdout
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert len(report["lstmd"]) == 7 and len(report["targets"]) == 3
    md = subprocess.run([sys.executable, script, "markdown", str(tmp_path / "gpu-check.json")],
                        capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "| step | B=4096 H=256 L=1 I=64 S=1e6 | triton tiled 64x32 (auto) | 0.05 | 400 | 13% | 3.50x |" in md
    assert "| lstmd | forecast | 256 | 100,000 | off | off | 2,000,000 | 1.0 | 9.0 |" in md
    assert "| p99 <= 10 ms at half that rate | 7.5 ms | yes |" in md
