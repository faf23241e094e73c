"""INT8 weights of the fully connected layers, activations quantized at run time."""

from mcp.quantization.methods import DeployInputs, QuantMethod, register_quant_method


def _dynamic(inputs: DeployInputs):
    from mcp.quantization.onnx_int8 import dynamic_int8

    return dynamic_int8(inputs.fp32_path, inputs.out, reduce_range=inputs.spec.reduce_range), "onnx_dynamic_int8"


register_quant_method(QuantMethod(
    name="dynamic_int8",
    summary="INT8 weights of the Linear layers, activations quantized at run time",
    deployed_as="ONNX Runtime's `quantize_dynamic` (Gemm rewritten as MatMul + Add first)",
    deploy=_dynamic, int8_only=True, sim_mode="dynamic", linear_only=True))
