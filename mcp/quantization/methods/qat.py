"""Quantization-aware training on the fixed_point grids."""

from mcp.quantization.methods import QuantMethod, register_quant_method
from mcp.quantization.methods._grid import grid_remarks

register_quant_method(QuantMethod(
    name="qat",
    summary="the same grids as `fixed_point`, trained for `--epochs` with fake quantization and a "
            "straight-through estimator (activation ranges tracked by a moving min/max)",
    deployed_as="as `fixed_point`",
    deploy="grid_int8", sim_mode="train", fine_tunes=True, needs_epochs=True, remarks=grid_remarks))
