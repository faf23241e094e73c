"""Post-training static INT8, deployed through ONNX Runtime's static quantization (QDQ)."""

from mcp.quantization.methods import QuantMethod, register_quant_method

register_quant_method(QuantMethod(
    name="ptq_int8",
    summary="post-training static INT8: per-channel symmetric weights, per-tensor UINT8 activations calibrated "
            "on `--calib-batches` training batches with `--observer minmax\\|percentile\\|entropy`; BatchNorm "
            "folded by the export",
    deployed_as="ONNX Runtime's `quantize_static`, QDQ format, integer kernels; logits stay float. For "
                "`entropy`, the PyTorch fake-quant model uses the range of least quantization error instead of "
                "ONNX Runtime's KL calibration",
    deploy="qdq_int8", int8_only=True, calibrates=True))
