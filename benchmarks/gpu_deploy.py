"""The deployment table of benchmarks/deploy_vs_peer.py on a GPU: the same ONNX files
(mcp's, the peer's, the baseline), timed and scored with ONNX Runtime's CUDA execution
provider.

    python benchmarks/deploy_vs_peer.py --keep KEEP ...        # on the machine that trains
    python benchmarks/gpu_deploy.py KEEP [--rounds 5] [--seconds 0.5] [--batch 64]
        [--provider cuda|cpu] [--no-cuda-graph] [--out gpu.json]
    python benchmarks/gpu_deploy.py --from-json gpu.json       # the tables again

KEEP holds one folder per seed (manifest.json, test.npz, the files). Every file gets an
ONNX Runtime session of its own in this one process (graph optimisation ALL, the
default; inputs and outputs as NumPy arrays, so each call includes the copies to and
from the GPU, as a plain `session.run` does). Batch-1 latency is timed in --rounds
rounds in rotated order, --seconds per file per round; then throughput at --batch.
Accuracy is the CUDA provider's own on the test split. The comparison is the CPU
table's: mcp's fastest model within 1 point of the baseline against the peer's fastest
at least as accurate (-0.3 points), here by GPU latency.

It needs only numpy and onnxruntime-gpu (for --provider cuda), so it runs on a GPU
machine without the rest of mcp.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_vs_peer import compared, summary_table


def _providers(provider: str) -> list[str]:
    import onnxruntime as ort

    if provider == "cpu":
        return ["CPUExecutionProvider"]
    try:  # the CUDA and cuDNN libraries of the nvidia-* wheels beside PyTorch, if any
        import torch  # noqa: F401
    except ImportError:
        pass
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        sys.exit(f"error: provider cuda: onnxruntime {ort.__version__} offers {ort.get_available_providers()}; "
                 "install onnxruntime-gpu")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _session(path: Path, providers: list[str]):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=providers)
    if session.get_providers()[0] != providers[0]:
        sys.exit(f"error: {path}: ONNX Runtime gave {session.get_providers()}, not {providers[0]}")
    return session


def graph_call(path: Path, one: np.ndarray, expected: np.ndarray):
    """A CUDA-graph session of ``path`` (ONNX Runtime's ``enable_cuda_graph``: the whole
    model's kernels launched as one graph) and a function that runs it on a new batch-1
    input from the host and returns the logits on the host, as the plain call does; None
    when the model cannot be captured (a node that runs on the CPU, say) or its logits on
    ``one`` are not the plain session's ``expected``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options,
                                       providers=[("CUDAExecutionProvider", {"enable_cuda_graph": "1"})])
        x = ort.OrtValue.ortvalue_from_numpy(one, "cuda", 0)
        y = ort.OrtValue.ortvalue_from_shape_and_type(expected.shape, np.float32, "cuda", 0)
        binding = session.io_binding()
        binding.bind_ortvalue_input(session.get_inputs()[0].name, x)
        binding.bind_ortvalue_output(session.get_outputs()[0].name, y)
        session.run_with_iobinding(binding)  # the first run captures the graph
    except Exception as exc:  # noqa: BLE001 - reported as "not capturable" with its reason
        print(f"  {path.name}: no CUDA graph ({str(exc).splitlines()[0][:160]})")
        return None

    def call(batch: np.ndarray) -> np.ndarray:
        x.update_inplace(batch)
        session.run_with_iobinding(binding)
        return y.numpy()

    if not np.allclose(call(one), expected, atol=1e-4):
        print(f"  {path.name}: the CUDA graph's logits differ from the plain session's; not timed")
        return None
    return call


def _timed(fn, seconds: float) -> list[float]:
    times, end = [], time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        times.append((t1 - t0) * 1e3)
        if t1 >= end:
            return times


def one_seed(folder: Path, args, providers: list[str]) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    test = np.load(folder / "test.npz")
    x_test, y_test = test["x"], test["y"]
    rows = [dict(r) for r in manifest["rows"]]
    sessions = [_session(folder / r["file"], providers) for r in rows]
    name = sessions[0].get_inputs()[0].name
    for r, s in zip(rows, sessions):
        logits = np.concatenate([s.run(None, {name: x_test[i:i + 64]})[0] for i in range(0, len(x_test), 64)])
        r["accuracy"] = float((logits.argmax(1) == y_test).mean())
        r["size_kib"] = (folder / r["file"]).stat().st_size / 1024
    one = x_test[:1].copy()
    plain = [lambda s=s: s.run(None, {name: one}) for s in sessions]
    graphs = ([graph_call(folder / r["file"], one, s.run(None, {name: one})[0]) for r, s in zip(rows, sessions)]
              if args.cuda_graph and providers[0].startswith("CUDA") else [None] * len(rows))
    graphed = [(lambda g=g: g(one)) if g else None for g in graphs]
    for fn in plain + [g for g in graphed if g]:
        for _ in range(args.warmup):
            fn()
    calls: list[list[float]] = [[] for _ in rows]
    graph_calls: list[list[float]] = [[] for _ in rows]
    n = len(rows)
    for rnd in range(args.rounds):
        for k in [(rnd + i) % n for i in range(n)]:
            calls[k].append(_timed(plain[k], args.seconds))
            if graphed[k]:
                graph_calls[k].append(_timed(graphed[k], args.seconds))
    many = np.resize(x_test, (args.batch, *x_test.shape[1:])).astype(np.float32)
    for r, s, c, g in zip(rows, sessions, calls, graph_calls):
        medians = [float(np.median(t)) for t in c]
        r["p50_ms"] = float(np.median(np.concatenate(c)))
        r["graph_p50_ms"] = float(np.median(np.concatenate(g))) if g else None
        r["spread_pct"] = 100.0 * (max(medians) - min(medians)) / float(np.median(medians))
        for _ in range(3):
            s.run(None, {name: many})
        done, t0 = 0, time.perf_counter()
        while done < 5 or time.perf_counter() - t0 < args.seconds:
            s.run(None, {name: many})
            done += 1
        r["throughput_ips"] = args.batch * done / (time.perf_counter() - t0)
    base = rows[0]
    for r in rows:
        r["speedup"] = base["p50_ms"] / r["p50_ms"]
        r["graph_speedup"] = base["graph_p50_ms"] / r["graph_p50_ms"] if r["graph_p50_ms"] and base["graph_p50_ms"] \
            else None
    return compared(folder.name, rows)


def graph_view(runs: list[dict]) -> list[dict]:
    """The runs as their CUDA-graph figures say (rows that could not be captured left out)."""
    out = []
    for run in runs:
        rows = [dict(r, p50_ms=r["graph_p50_ms"], speedup=r["graph_speedup"]) for r in run["rows"]
                if r["graph_p50_ms"] and r["graph_speedup"]]
        if rows and rows[0]["tool"] == "baseline":
            out.append(compared(run["seed"], rows))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("keep", nargs="?", default="",
                        help="a folder of seed folders written by deploy_vs_peer.py --keep")
    parser.add_argument("--provider", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.5, help="per file per round")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64, help="batch of the throughput column")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                        help="also time each model captured as a CUDA graph (ONNX Runtime's enable_cuda_graph)")
    parser.add_argument("--out", default="", help="write the runs and a summary here (JSON)")
    parser.add_argument("--from-json", default="", help="print the tables of an earlier run's JSON and stop")
    args = parser.parse_args()
    if args.from_json:
        found = json.loads(Path(args.from_json).read_text())
        graphs = graph_view(found["runs"])
        print(summary_table(found["runs"], found["summary"]["where"]))
        if graphs:
            print("\nCaptured as CUDA graphs (the models that could be):\n\n" + summary_table(graphs, "CUDA graph"))
        return
    import onnxruntime as ort

    folders = sorted(p.parent for p in Path(args.keep).glob("*/manifest.json"))
    if not folders:
        sys.exit(f"error: keep folder {args.keep!r} holds no <seed>/manifest.json; "
                 "make one with deploy_vs_peer.py --keep")
    providers = _providers(args.provider)
    device = "CPU"
    if args.provider == "cuda":
        try:
            import torch

            device = torch.cuda.get_device_name(0)
        except Exception:  # noqa: BLE001 - the name is only a label
            device = "GPU"
    t0 = time.time()
    runs = [one_seed(f, args, providers) for f in folders]
    where = f"{args.provider.upper()} EP"
    for run in runs:
        print(f"\n{run['seed']}\n\n| tool | model | accuracy | ONNX KiB | {where} p50 ms | speedup | "
              f"CUDA graph p50 ms | speedup | batch {args.batch} images/s | spread over rounds |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
        for r in run["rows"]:
            graph = (f"{r['graph_p50_ms']:.4f} | " + (f"{r['graph_speedup']:.2f}x" if r["graph_speedup"] else "-")
                     if r["graph_p50_ms"] else "- | -")
            print(f"| {r['tool']} | {r['label']} | {100 * r['accuracy']:.2f}% | {r['size_kib']:.1f} | "
                  f"{r['p50_ms']:.4f} | {r['speedup']:.2f}x | {graph} | {r['throughput_ips']:.0f} | "
                  f"{r['spread_pct']:.1f}% |")
    ratios = [r["mcp_vs_peer"] for r in runs if r["mcp_vs_peer"]]
    graphs = graph_view(runs)
    summary = {"seeds": len(runs), "wall_s": time.time() - t0, "command": " ".join(sys.argv), "where": where,
               "device": device, "onnxruntime": ort.__version__, "mcp_vs_peer": ratios,
               "mcp_vs_peer_cuda_graph": [r["mcp_vs_peer"] for r in graphs if r["mcp_vs_peer"]]}
    print("\n" + summary_table(runs, where))
    if graphs:
        print("\nCaptured as CUDA graphs (the models that could be):\n\n" + summary_table(graphs, "CUDA graph"))
    print("\n" + json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
