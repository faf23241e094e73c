"""INT8 weights of the fully connected layers, activations quantized at run time."""

from mcp.quantization.methods import QuantMethod, register_quant_method

register_quant_method(QuantMethod(
    name="dynamic_int8",
    summary="INT8 weights of the Linear layers, activations quantized at run time",
    deployed_as="ONNX Runtime's `quantize_dynamic` (Gemm rewritten as MatMul + Add first)",
    deploy="dynamic_int8", int8_only=True, sim_mode="dynamic", linear_only=True))
