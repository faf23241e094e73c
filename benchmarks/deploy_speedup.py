"""Deployed speed of compressed models: structured pruning and INT8 against the FP32 baseline.

    python benchmarks/deploy_speedup.py [--model resnet20] [--input-shape 1x32x32] [--epochs 30]
                                        [--sparsities 0.5,0.75] [--threads 1]

In a tracking store of its own (--tracking-uri, default sqlite:///mlruns/deploy_speedup.db)
it runs the pipeline a user would run on the embedded digits data:

1. `mcp train` (registered as <model>-digits@baseline);
2. `mcp prune --granularity structured --scope layerwise` at each sparsity (channels
   physically removed, --prune-epochs of fine-tuning);
3. `mcp quantize --method ptq_int8` of the baseline and of each pruned version;
4. one `mcp benchmark` over every version (the equivalent command is printed), which
   measures each ONNX model in ONNX Runtime with a fixed thread count.

It then names the best structured-pruned + INT8 model (fastest at batch 1 among those
within --max-drop points of the baseline) and its speedups.
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--input-shape", default="1x32x32", help="digits resized (1x8x8: the original size)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--prune-epochs", type=int, default=20)
    parser.add_argument("--sparsities", default="0.5,0.75", help="structured (channel) sparsities")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-drop", type=float, default=1.0, help="accuracy points")
    parser.add_argument("--tracking-uri", default="sqlite:///mlruns/deploy_speedup.db")
    args = parser.parse_args()

    os.makedirs("mlruns", exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    import mlflow

    from mcp.config import BenchmarkConfig, PruneConfig, QuantizeConfig, TrainConfig
    from mcp.stages.benchmark import run_benchmark
    from mcp.stages.prune import run_prune
    from mcp.stages.quantize import run_quantize
    from mcp.stages.train import run_train

    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment("benchmark-deploy-speedup")
    data = dict(dataset="digits", input_shape=args.input_shape)
    base = run_train(TrainConfig(model=args.model, epochs=args.epochs, **data), show_progress=False)
    print(f"baseline {args.model}: test accuracy {base.metrics['test_accuracy']:.4f}", flush=True)
    run_quantize(QuantizeConfig(model=args.model, **data), show_progress=False)
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        pruned = run_prune(PruneConfig(model=args.model, granularity="structured", scope="layerwise",
                                       sparsity=sparsity, epochs=args.prune_epochs, **data), show_progress=False)
        uri = f"models:/{pruned.registered_name}/{pruned.registered_version}"
        run_quantize(QuantizeConfig(model=args.model, model_uri=uri, **data), show_progress=False)
        print(f"pruned {sparsity:.0%} channels: test accuracy {pruned.metrics['test_accuracy']:.4f}", flush=True)

    cfg = BenchmarkConfig(model=args.model, threads=args.threads, **data)
    print(f"\nMLFLOW_TRACKING_URI={args.tracking_uri} mcp benchmark --model {args.model} "
          f"--input-shape {args.input_shape} --threads {args.threads}\n")
    result = run_benchmark(cfg, show_progress=False)
    print(result.markdown)
    candidates = [r for r in result.rows if r["deploy_format"] == "onnx_qdq_int8" and " of v" in r["label"]
                  and -100 * r["accuracy_delta"] <= args.max_drop]
    if candidates:
        best = max(candidates, key=lambda r: r["speedup_p50_cpu"])
        print(f"\nbest structured-pruned + INT8 within {args.max_drop:g} point(s): {best['label']}: "
              f"p50 {best['speedup_p50_cpu']:.2f}x, throughput {best['speedup_throughput_cpu']:.2f}x, "
              f"accuracy {100 * best['accuracy_delta']:+.2f} points")
    else:
        print(f"\nno structured-pruned + INT8 model within {args.max_drop:g} point(s) of the baseline")


if __name__ == "__main__":
    main()
