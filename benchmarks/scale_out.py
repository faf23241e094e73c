"""Throughput of one search study shared by 1, 2 and 4 `mcp search` workers, on the local
stores (SQLite tracking database, Optuna's SQLite storage beside it) and on an MLflow
tracking server backed by PostgreSQL (Optuna's storage on the same PostgreSQL).

For each backend and worker count: a fresh store, the baseline trained once (not timed),
then N workers started together on one study of ``--trials`` trials. Trials per minute are
counted over the trial phase (first trial started to last trial finished, from Optuna's
own timestamps); the wall time also includes each worker's start-up and the winner's
rebuild and registration. Each worker runs with one thread (OMP_NUM_THREADS=1).

    python benchmarks/scale_out.py --trials 40 --workers 1,2,4 --repeats 2 \\
        --out benchmarks/results/scale_out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the throwaway PostgreSQL and MLflow servers the tests use

COMMON = ["--model", "lenet300_100", "--dataset", "digits", "--seed", "0"]
SEARCH = ["--budget-ratio", "0.05", "--pruner", "none", "--export", "false", "--benchmark", "false",
          "--heartbeat", "10"]


def _env(tracking_uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _mcp(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "mcp", *args], env=env, cwd=cwd, stdout=out,
                                stderr=subprocess.STDOUT)


def one_study(tracking_uri: str, storage: str, workers: int, trials: int, work: Path) -> dict:
    import optuna

    env = _env(tracking_uri)
    train = _mcp(["train", *COMMON], env, work, work / "train.log")
    if train.wait() != 0:
        raise SystemExit(f"baseline training failed: {(work / 'train.log').read_text()[-2000:]}")
    started = time.perf_counter()
    procs = [_mcp(["search", *COMMON, *SEARCH, "--trials", str(trials), "--storage", storage], env, work,
                  work / f"worker{i}.log") for i in range(workers)]
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - started
    if any(codes):
        bad = codes.index(next(c for c in codes if c))
        raise SystemExit(f"worker {bad} failed: {(work / f'worker{bad}.log').read_text()[-2000:]}")
    study = optuna.load_study(study_name="lenet300_100-digits-max-accuracy", storage=storage)
    done = [t for t in study.trials if t.state.is_finished()]
    assert len(done) == trials, f"{len(done)} trials finished, {trials} asked"
    first = min(t.datetime_start for t in done)
    last = max(t.datetime_complete for t in done)
    phase = (last - first).total_seconds()
    return {"workers": workers, "trials": trials, "trial_phase_s": phase, "wall_s": wall,
            "trials_per_min": 60.0 * trials / phase}


@contextlib.contextmanager
def backend(kind: str, work: Path):
    """(tracking URI, Optuna storage URL) of a fresh store of this kind."""
    if kind == "sqlite":
        yield f"sqlite:///{work / 'mlflow.db'}", f"sqlite:///{work / 'optuna.db'}"
        return
    from servers import mlflow_server, postgres_server

    with postgres_server() as pg, mlflow_server(f"{pg}/mlflow", work / "artifacts") as url:
        yield url, f"{pg}/optuna"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--backends", default="sqlite,server")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    rows = []
    for kind in args.backends.split(","):
        for workers in counts:
            runs = []
            for repeat in range(args.repeats):
                with tempfile.TemporaryDirectory(prefix="mcp-scale-") as tmp:
                    work = Path(tmp)
                    with backend(kind, work) as (tracking_uri, storage):
                        runs.append(one_study(tracking_uri, storage, workers, args.trials, work))
                print(f"{kind:6s} workers={workers} repeat={repeat}: {runs[-1]['trials_per_min']:.2f} trials/min "
                      f"(trial phase {runs[-1]['trial_phase_s']:.1f} s, wall {runs[-1]['wall_s']:.1f} s)",
                      flush=True)
            rate = [r["trials_per_min"] for r in runs]
            wall = [r["wall_s"] for r in runs]
            rows.append({"backend": kind, "workers": workers, "trials": args.trials, "runs": runs,
                         "trials_per_min_mean": statistics.mean(rate),
                         "trials_per_min_sd": statistics.stdev(rate) if len(rate) > 1 else 0.0,
                         "wall_s_mean": statistics.mean(wall)})
    base = {r["workers"]: r["trials_per_min_mean"] for r in rows if r["backend"] == "sqlite"}
    print("\n| backend | workers | trials/min (mean ± sd) | speed-up vs 1 worker | wall time (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        one = next((x["trials_per_min_mean"] for x in rows if x["backend"] == r["backend"] and x["workers"] == 1),
                   None)
        speedup = f"{r['trials_per_min_mean'] / one:.2f}x" if one else ""
        print(f"| {'SQLite (local)' if r['backend'] == 'sqlite' else 'MLflow server + PostgreSQL'} | {r['workers']} "
              f"| {r['trials_per_min_mean']:.2f} ± {r['trials_per_min_sd']:.2f} | {speedup} | {r['wall_s_mean']:.0f} |")
    for r in rows:
        if r["backend"] != "sqlite" and r["workers"] in base:
            print(f"tracking server overhead at {r['workers']} worker(s): "
                  f"{100 * (base[r['workers']] / r['trials_per_min_mean'] - 1):+.1f}% time per trial vs SQLite")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
