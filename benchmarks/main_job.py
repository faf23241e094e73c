"""Where the main job's seconds go: the README's first command, timed step by step.

    python benchmarks/main_job.py [--repeat 3] [--project .]

Each repeat runs `mlflow run <project> --env-manager local` (the main entry point with its
defaults: LeNet-300-100 on the embedded digits) in a new empty directory, so the tracking
store, the study and the registry are new, as on a user's first run. The wall time is the
command's, from start to exit. The steps' times are the MLflow runs' own start and end
times in that store:

- start-up: from the command's start to the first stage's run (MLflow's CLI, the store's
  creation, `mcp`'s imports, the data);
- train, prune, quantize, export (all its runs), benchmark: the stage's runs;
- search: its run, split into the time before its first trial (the search's set-up and
  the sizing of its uniform starts), its trials and the winner's rebuild;
- promote and close: from the benchmark's end to the command's exit;
- between the steps: what no run covers.

Prints one markdown table: median over the repeats, and min-max when there are several.
It needs an idle machine: a second process on the cores makes every step slower.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ORDER = ["start-up", "train", "prune", "quantize", "search: set-up and starts", "search: trials",
         "search: winner", "search: logging", "export", "benchmark", "promote and close", "between the steps", "total"]


def _steps(store: Path, t_start: float, t_end: float) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    runs = []
    for exp in client.search_experiments():
        runs += client.search_runs([exp.experiment_id], max_results=1000)
    spans = sorted((r.info.start_time / 1000, (r.info.end_time or r.info.start_time) / 1000, r.info.run_name or "")
                   for r in runs)
    stages = [s for s in spans if s[2].split("-")[0] in ("train", "prune", "quantize", "search", "export", "benchmark")]
    trials = [s for s in spans if s[2].startswith("trial-")]
    winners = [s for s in spans if s[2].startswith("winner-")]
    out: dict[str, float] = {"start-up": stages[0][0] - t_start}
    covered = 0.0
    for start, end, name in stages:
        step = name.split("-")[0]
        if step == "search":
            first = trials[0][0] if trials else end
            last = max((e for _, e, _ in trials + winners), default=first)
            out["search: set-up and starts"] = first - start
            out["search: trials"] = (trials[-1][1] - first) if trials else 0.0
            out["search: winner"] = sum(e - s for s, e, _ in winners)
            out["search: logging"] = end - last
        else:
            out[step] = out.get(step, 0.0) + end - start
        covered += end - start
    benchmark_end = max(e for _, e, n in stages if n.startswith("benchmark"))
    out["promote and close"] = t_end - benchmark_end
    out["between the steps"] = (benchmark_end - stages[0][0]) - covered
    out["total"] = t_end - t_start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--project", default=str(Path(__file__).resolve().parents[1]),
                        help="the mcp project folder (default: this checkout)")
    args = parser.parse_args()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    results: list[dict[str, float]] = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
            t0 = time.time()
            done = subprocess.run([str(mlflow_cli), "run", args.project, "--env-manager", "local"], cwd=tmp, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            t1 = time.time()
            if done.returncode:
                sys.exit(f"the main job failed (exit {done.returncode}):\n{done.stdout[-3000:]}")
            store = Path(tmp) / "mlflow.db"
            if not store.exists():
                sys.exit(f"no tracking store at {store}; the main job wrote its runs elsewhere")
            results.append(_steps(store, t0, t1))
            print(f"repeat {i + 1}/{args.repeat}: {t1 - t0:.1f} s", file=sys.stderr)
    print(f"`mlflow run . --env-manager local` from an empty directory; seconds, median of {args.repeat}"
          + (" (min-max)" if args.repeat > 1 else "") + "\n")
    print("| step | seconds |\n|---|---|")
    for key in ORDER:
        values = [r.get(key, 0.0) for r in results]
        spread = f" ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else ""
        print(f"| {key} | {statistics.median(values):.1f}{spread} |")


if __name__ == "__main__":
    main()
