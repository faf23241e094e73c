"""Uniform fixed point at 2-8 bits, per layer, no training."""

from mcp.quantization.methods import QuantMethod, register_quant_method
from mcp.quantization.methods._grid import grid_remarks

register_quant_method(QuantMethod(
    name="fixed_point",
    summary="uniform weights at `--bits` 2-8 (one number, or per layer with `--bits-file` YAML `layer: bits`), "
            "symmetric or asymmetric, per channel or per tensor; optional `--act-bits` with calibrated "
            "activation ranges; no training",
    deployed_as="INT8 initializers + `DequantizeLinear` per channel, exact",
    deploy="grid_int8", calibrates=True, remarks=grid_remarks))
