"""What fixed_point and QAT share: weights on uniform b-bit grids, deployed as INT8."""


def grid_remarks(fmt: str, spec) -> list[str]:
    out = []
    if fmt == "onnx_fp32":
        out.append("these integers do not fit INT8 (8-bit asymmetric), so float32 is the nearest deployable format")
    if spec.act_bits:
        out.append(f"activations are quantized to {spec.act_bits} bits in PyTorch only, float in the ONNX model")
    return out


def shared_remarks(fmt: str, spec) -> list[str]:
    return ["k-means codebooks have no ONNX Runtime format (the compressed payload is the small artifact)"]
