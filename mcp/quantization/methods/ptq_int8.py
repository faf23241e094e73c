"""Post-training static INT8, deployed through ONNX Runtime's static quantization (QDQ)."""

from mcp.quantization.methods import DeployInputs, QuantMethod, register_quant_method


def _qdq(inputs: DeployInputs):
    from mcp.quantization.onnx_int8 import static_int8

    spec = inputs.spec
    return (static_int8(inputs.fp32_path, inputs.out, inputs.calib, spec.observer, reduce_range=spec.reduce_range,
                        float_layers=inputs.quantizer.float_layers()), "onnx_qdq_int8")


register_quant_method(QuantMethod(
    name="ptq_int8",
    summary="post-training static INT8: per-channel symmetric weights, per-tensor UINT8 activations calibrated "
            "on `--calib-batches` training batches with `--observer minmax\\|percentile\\|entropy`; BatchNorm "
            "folded by the export",
    deployed_as="ONNX Runtime's `quantize_static`, QDQ format, integer kernels; logits stay float. For "
                "`entropy`, the PyTorch fake-quant model uses the range of least quantization error instead of "
                "ONNX Runtime's KL calibration",
    deploy=_qdq, int8_only=True, calibrates=True))
