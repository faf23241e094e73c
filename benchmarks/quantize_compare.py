"""Every quantization method on one model, then Deep Compression over several seeds.

    python benchmarks/quantize_compare.py [--model lenet300_100] [--seeds 3]

One invocation: tracked `mcp quantize` runs on the same registered baseline (trained
first if missing). Part 1 runs each method once at its usual setting; part 2 runs the
full Deep Compression pipeline (prune 94% gradual over 80 epochs, 4-bit k-means weight sharing with
shared biases and 30 epochs of centroid fine-tuning, Huffman coding) once per seed and
prints the size after each stage. Accuracies are measured in ONNX Runtime on the test
split; sizes are the lengths of the encoded payloads and of the ONNX files.
"""

from __future__ import annotations

import argparse
import statistics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lenet300_100")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sparsity", type=float, default=0.94)
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args()

    import mlflow
    import torch

    from mcp.config import QuantizeConfig
    from mcp.stages.quantize import run_quantize

    mlflow.set_experiment("benchmark-quantize-compare")
    common = dict(model=args.model, dataset=args.dataset, register=False)
    methods = [("ptq_int8", {}), ("dynamic_int8", {}), ("fixed_point", {"bits": 4}),
               ("qat", {"bits": 4, "epochs": 10}), ("kmeans", {"bits": 4, "epochs": 10}),
               ("huffman", {"bits": 4, "epochs": 10})]
    rows = []
    for method, extra in methods:
        r = run_quantize(QuantizeConfig(method=method, **extra, **common), show_progress=False)
        rows.append((method, extra.get("bits", 8), r.metrics, r.tags["mcp.deploy_format"]))

    print(f"\n{args.model} on {args.dataset}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    base = rows[0][2]
    print(f"baseline test accuracy {100 * base['baseline_test_accuracy']:.2f}%, "
          f"float32 size {int(base['size_bytes_fp32']):,} B\n")
    print("| method | weight bits | accuracy PyTorch | accuracy ONNX Runtime | drop (points) | compressed (B) "
          "| ratio | ONNX file (B) | deployed as |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method, bits, m, fmt in rows:
        print(f"| {method} | {bits} | {100 * m['test_accuracy']:.2f}% | {100 * m['onnx_test_accuracy']:.2f}% "
              f"| {100 * m['accuracy_drop']:.2f} | {int(m['size_bytes_compressed']):,} "
              f"| {m['compression_ratio']:.1f}x | {int(m['size_bytes_onnx']):,} | {fmt} |")

    print(f"\nDeep Compression: prune {args.sparsity:.0%} (gradual), {args.bits}-bit k-means with shared biases, "
          f"Huffman; {args.seeds} seeds\n")
    print("| seed | accuracy | drop (points) | pruned (B) | + k-means (B) | + Huffman (B) | ratio pruned "
          "| ratio k-means | ratio Huffman |")
    print("|---|---|---|---|---|---|---|---|---|")
    ratios, drops = [], []
    for seed in range(args.seeds):
        r = run_quantize(QuantizeConfig(method="deep_compression", bits=args.bits, sparsity=args.sparsity,
                                        share_biases="true", epochs=30, seed=seed, **common), show_progress=False)
        m, s = r.metrics, r.stages
        ratios.append(s["fp32"] / s["huffman"])
        drops.append(100 * m["accuracy_drop"])
        print(f"| {seed} | {100 * m['onnx_test_accuracy']:.2f}% | {drops[-1]:.2f} | {s['pruned']:,} | {s['kmeans']:,} "
              f"| {s['huffman']:,} | {s['fp32'] / s['pruned']:.1f}x | {s['fp32'] / s['kmeans']:.1f}x "
              f"| {ratios[-1]:.1f}x |")
    spread = statistics.stdev if len(ratios) > 1 else (lambda _: 0.0)
    print(f"\nmean compression {statistics.mean(ratios):.1f}x (sd {spread(ratios):.1f}), "
          f"mean accuracy drop {statistics.mean(drops):.2f} points (sd {spread(drops):.2f})")


if __name__ == "__main__":
    main()
