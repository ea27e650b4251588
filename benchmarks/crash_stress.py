"""Crash loop: SIGKILL a real `lstmd serve` at random moments while a producer streams numbered events.

The daemon runs as a subprocess with the write-ahead log on; a producer thread streams each stream's fixed
event sequence with per-stream sequence numbers and resends whatever was not acknowledged (same numbers) when
the daemon disappears. A killer sends SIGKILL at random moments (mostly under traffic, sometimes during the
restore at start) and restarts the daemon on the same ports. At the end, after one last SIGKILL and restart,
every stream must have applied exactly the events sent (count and last sequence number), and its (h, c) must
equal torch.nn.LSTM run over the stream's events with the daemon's exported weights (training is off).

Tolerance: |Δ| ≤ 1e-5 absolute on h and c (float32, hidden 16, 2 layers, ≤ a few hundred steps). The daemon
steps each stream once per launch inside batches whose composition depends on timing (and replay re-batches a
logged batch without its duplicates), while nn.LSTM runs one sequence with its own matmul blocking, so
float32 rounding differs by a few ulps per step; nothing lost or applied twice would show as a difference of
order 1e-1.

    python benchmarks/crash_stress.py --kills 50 --streams 200 --events 300

tests/test_crash.py runs `run()` with CI-sized arguments (≥ 10 kills in well under 90 s).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from lstmd.clients.bench import LSTMD_COMMAND, free_tcp_port

TOLERANCE = 1e-5
OK = ("ok", "duplicate")  # a duplicate is an event applied before a crash whose reply was lost
INPUT, HIDDEN, LAYERS, OUTPUT = 4, 16, 2, 2


@dataclass
class CrashReport:
    kills: int = 0  # SIGKILLs survived (each followed by a restart and restore)
    kills_during_start: int = 0  # of those, sent before the restarted daemon was ready
    streams: int = 0
    events_sent: int = 0  # distinct events (stream, seq) acknowledged
    events_checked: int = 0  # events whose effect the final (h, c) comparison covers
    resends_answered_duplicate: int = 0  # events applied before a crash whose reply was lost
    max_abs_diff: float = 0.0  # training off: final (h, c) vs nn.LSTM
    model_versions: tuple[int, int] = (0, 0)  # training on: (highest version in any reply, version at the end)
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


class _Daemon:
    """The daemon subprocess: start, wait until it answers, SIGKILL."""

    def __init__(self, config: Path, log_path: Path, control: str) -> None:
        self.config, self.log_path, self.control = config, log_path, control
        self.proc: subprocess.Popen | None = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LSTMD_")}

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*LSTMD_COMMAND, "serve", "--config", str(self.config)], env=self.env, stdout=log, stderr=log
            )

    def wait_ready(self, timeout: float = 60.0) -> None:
        from lstmd.clients import Admin

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}; see {self.log_path}")
            try:
                Admin(self.control, timeout=0.3).status()
                return
            except TimeoutError:
                continue
        raise RuntimeError(f"daemon not ready within {timeout}s; see {self.log_path}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def _reference_states(model_path: Path, sequences: dict) -> dict:
    import torch
    from lstmd.daemon.model import ServingModel

    lstm, _ = ServingModel.from_bytes(model_path.read_bytes()).to_modules()
    out = {}
    with torch.no_grad():
        for sid, xs in sequences.items():
            _, (h, c) = lstm(torch.from_numpy(xs)[None])
            out[sid] = (h[:, 0].numpy(), c[:, 0].numpy())
    return out


def run(
    workdir: Path,
    kills: int = 10,
    streams: int = 40,
    events: int = 60,
    seed: int = 0,
    fsync: str = "always",
    gap: tuple[float, float] = (0.02, 1.0),
    verbose: bool = False,
    train: bool = False,
) -> CrashReport:
    """One crash loop; returns what happened and what was checked (failures listed, not raised).

    train=True: online training runs (regression targets are sent), so weights change while serving; then the
    check is counts and last sequence numbers only (none lost, none twice), plus that the model version at the
    end is at least every version that answered an event (a published model is logged before its events).
    """
    from lstmd.clients import Admin, Producer

    started = time.monotonic()
    rng = np.random.default_rng(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    events_ep = f"tcp://127.0.0.1:{free_tcp_port()}"
    control_ep = f"tcp://127.0.0.1:{free_tcp_port()}"
    config = workdir / "lstmd.toml"
    config.write_text(
        f"[model]\ninput_size = {INPUT}\nhidden_size = {HIDDEN}\nnum_layers = {LAYERS}\noutput_size = {OUTPUT}\n"
        f"seed = {seed}\n"
        f"[serve]\nevents = '{events_ep}'\ncontrol = '{control_ep}'\npublish = ''\nmetrics = ''\ndevice = 'cpu'\n"
        f"[state]\ndir = '{workdir / 'state'}'\ncapacity = {2 * streams}\n"
        f"[durability]\nwal = true\nfsync = '{fsync}'\nfsync_interval_ms = 50\nsnapshot_interval_s = 2\n"
        + (
            "[train]\nenabled = true\ninterval = 0.5\nk2 = 8\nrecord_steps = 32\nbatch = 16\nsteps = 5\n"
            "min_windows = 1\nthreads = 1\ntolerance = 1.0\n"
            if train
            else ""
        )
    )
    ids = [f"s{i}" if i % 2 else i for i in range(streams)]  # str and int ids
    sequences = {sid: rng.standard_normal((events, INPUT)).astype(np.float32) for sid in ids}
    targets = {sid: np.tanh(xs[:, :OUTPUT] * 2).astype(np.float32) for sid, xs in sequences.items()}
    seen_version = [0]
    report = CrashReport(streams=streams)
    daemon = _Daemon(config, workdir / "daemon.log", control_ep)
    total = streams * events
    sent = {sid: 0 for sid in ids}  # acknowledged events per stream
    progress = [0]
    allowed = [total // (kills + 1)]  # the producer waits here until the next kill, so every kill hits traffic
    done = threading.Event()
    errors: list[str] = []

    def produce() -> None:
        prng = np.random.default_rng(seed + 1)
        producer = Producer(events_ep, timeout=1.0, retries=2)
        try:
            while progress[0] < total:
                if progress[0] >= allowed[0]:
                    time.sleep(0.01)
                    continue
                open_ids = [sid for sid in ids if sent[sid] < events]
                chosen = prng.choice(len(open_ids), size=min(len(open_ids), 12), replace=False)
                batch_ids, batch_seqs, rows, ys = [], [], [], []
                for j in chosen.tolist():
                    sid = open_ids[j]
                    take = min(int(prng.integers(1, 4)), events - sent[sid])  # up to 3 events of a stream
                    for k in range(sent[sid], sent[sid] + take):
                        batch_ids.append(sid)
                        batch_seqs.append(k)
                        rows.append(sequences[sid][k])
                        ys.append(targets[sid][k])
                x, y = np.stack(rows), (np.stack(ys) if train else None)
                while True:  # resend the same events with the same numbers until acknowledged
                    try:
                        result = producer.send_detailed(batch_ids, x, y, seqs=batch_seqs)
                        break
                    except TimeoutError:
                        continue
                names = result.status_names
                bad = [
                    f"{batch_ids[i]}#{batch_seqs[i]}: {n}" for i, n in enumerate(names) if n not in ("ok", "duplicate")
                ]
                if bad:
                    errors.append(f"unexpected status {bad[:3]} ({result.reasons})")
                    return
                report.resends_answered_duplicate += names.count("duplicate")
                seen_version[0] = max(seen_version[0], result.version)
                for sid in batch_ids:
                    sent[sid] += 1
                progress[0] += len(batch_ids)
        except Exception as exc:  # reported as a failure below
            errors.append(f"producer: {exc!r}")
        finally:
            producer.close()
            done.set()

    daemon.start()
    try:
        daemon.wait_ready()
        thread = threading.Thread(target=produce, name="crash-producer", daemon=True)
        thread.start()
        while report.kills < kills and not done.is_set():
            during_start = rng.random() < 0.15
            if during_start:
                time.sleep(float(rng.uniform(0.0, 2.5)))  # somewhere in the import/restore/replay at start
            else:  # under traffic: at a random point of this round's share of the events
                low = total * report.kills // (kills + 1)
                target = int(rng.uniform(low, allowed[0]))
                deadline = time.monotonic() + gap[1] * 10
                while progress[0] < target and not done.is_set() and time.monotonic() < deadline:
                    time.sleep(0.001)
                time.sleep(float(rng.uniform(0, gap[0])))
            was_ready = True
            if during_start:
                was_ready = _answers(control_ep)
            daemon.kill()
            report.kills += 1
            report.kills_during_start += int(not was_ready)
            if verbose:
                print(f"kill {report.kills}: {progress[0]}/{total} events acknowledged", flush=True)
            allowed[0] = total * (report.kills + 1) // (kills + 1) if report.kills < kills else total
            daemon.start()
            if not during_start or rng.random() < 0.5:
                daemon.wait_ready()
        allowed[0] = total
        daemon.wait_ready()
        thread.join(600)
        if errors:
            report.failures += errors
            return report
        # One more SIGKILL after the last acknowledgement: what the producer saw acknowledged must survive.
        daemon.kill()
        report.kills += 1
        daemon.start()
        daemon.wait_ready()
        admin = Admin(control_ep)
        model_path = workdir / "model.safetensors"
        final_version = admin.export_model(model_path)["version"]
        report.model_versions = (seen_version[0], final_version)
        if final_version < seen_version[0]:
            report.failures.append(f"model version {final_version} after restart, but {seen_version[0]} answered")
        reference = None if train else _reference_states(model_path, sequences)
        report.events_sent = sum(sent.values())
        for sid in ids:
            info = admin.stream(sid)
            if (info["events"], info["last_seq"]) != (events, events - 1):
                report.failures.append(
                    f"stream {sid!r}: {info['events']} events applied (last seq {info['last_seq']}), {events} sent"
                )
                continue
            report.events_checked += events
            if reference is None:
                continue
            h_ref, c_ref = reference[sid]
            diff = max(
                float(np.abs(np.asarray(info["h"], dtype=np.float32) - h_ref).max()),
                float(np.abs(np.asarray(info["c"], dtype=np.float32) - c_ref).max()),
            )
            report.max_abs_diff = max(report.max_abs_diff, diff)
            if diff > TOLERANCE:
                report.failures.append(f"stream {sid!r}: (h, c) differ from nn.LSTM by {diff:.2e}")
    finally:
        daemon.stop()
        report.seconds = round(time.monotonic() - started, 1)
    return report


def _answers(control: str) -> bool:
    from lstmd.clients import Admin

    try:
        Admin(control, timeout=0.05).status()
        return True
    except TimeoutError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--events", type=int, default=300, help="events per stream")
    parser.add_argument("--fsync", choices=["always", "interval", "never"], default="always")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", action="store_true", help="online training on: counts checked, not (h, c)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lstmd-crash-") as tmp:
        workdir = args.workdir or Path(tmp)
        report = run(
            workdir,
            args.kills,
            args.streams,
            args.events,
            args.seed,
            args.fsync,
            verbose=not args.json,
            train=args.train,
        )
        if args.json:
            print(json.dumps(report.__dict__))
        else:
            print(
                f"kills survived: {report.kills} ({report.kills_during_start} during start/restore); "
                f"streams: {report.streams}; events sent: {report.events_sent}; events checked: "
                f"{report.events_checked}; resends answered duplicate: {report.resends_answered_duplicate}; "
                + (
                    "model versions: highest answered {}, at the end {}; ".format(*report.model_versions)
                    if args.train
                    else f"max |Δ(h, c)| vs nn.LSTM: {report.max_abs_diff:.2e} (tolerance {TOLERANCE:g}); "
                )
                + f"{report.seconds}s"
            )
            for failure in report.failures[:20]:
                print("FAIL", failure)
    sys.exit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
