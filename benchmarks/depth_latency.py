"""Where the latency of a narrow network goes: channels against operators.

    python benchmarks/depth_latency.py [--input-shape 1x32x32] [--rounds 5] [--seconds 0.5] [--threads 1]

Untrained ResNet-20s (latency depends on the shapes alone) at several channel widths,
whole and with residual blocks removed by :func:`mcp.pruning.depth.remove_blocks` (the
last blocks of each stage first, for a fixed layout), exported to ONNX and timed in ONE
process with ONNX Runtime (batch 1, default optimisation level), rounds in rotated order
(benchmarks/peer_tp_ort.py's ``time_files``). Prints a markdown table: p50 per file, its
Conv count and its spread over rounds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

WIDTHS = [(16, 32, 64), (8, 16, 32), (6, 12, 24), (4, 8, 16), (2, 4, 8), (1, 1, 1)]
# blocks removed, per stage's tail: ResNet-20 keeps layerN.0 (and may lose layer1.0 too)
REMOVED = {0: [], 3: ["layer1.2", "layer2.2", "layer3.2"],
           6: ["layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2"]}


def main() -> None:
    import onnx

    from mcp.models.cifar_resnet import CifarResNet
    from mcp.pruning.depth import remove_blocks
    from peer_tp_ort import export, time_files

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-shape", default="1x32x32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.input_shape.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for widths in WIDTHS:
            for removed, blocks in REMOVED.items():
                model = CifarResNet(20, 10, shape, widths).eval()
                model.mcp_recipe = {}
                remove_blocks(model, blocks)
                path = export(model, shape, Path(tmp) / f"w{'-'.join(map(str, widths))}_d{removed}.onnx")
                files[(widths, removed)] = str(path)
        times = time_files(list(files.values()), shape, rounds=args.rounds, threads=args.threads,
                           seconds=args.seconds)
        print(f"ResNet-20 at {args.input_shape}, untrained, ONNX Runtime CPU, batch 1, {args.threads} thread(s), "
              f"{args.rounds} rotated rounds\n")
        print("| channels | blocks removed (of 9) | Conv nodes | p50 ms | spread over rounds |\n|---|---|---|---|---|")
        for (widths, removed), path in files.items():
            convs = sum(n.op_type == "Conv" for n in onnx.load(path).graph.node)
            t = times[path]
            print(f"| {'/'.join(map(str, widths))} | {removed} | {convs} | {t['p50_ms']:.4f} | {t['spread_pct']:.1f}% |")


if __name__ == "__main__":
    main()
