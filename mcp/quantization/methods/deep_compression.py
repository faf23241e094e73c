"""Han et al.'s Deep Compression: prune, k-means weight sharing, Huffman coding."""

from mcp.quantization.methods import QuantMethod, register_quant_method
from mcp.quantization.methods._grid import shared_remarks

register_quant_method(QuantMethod(
    name="deep_compression",
    summary="Han et al. in one command: the prune stage (nested run: `--sparsity` 0.94, `--prune-schedule "
            "gradual`, `--prune-epochs` 80), then `kmeans`, then Huffman, with the size after each stage",
    deployed_as="as `kmeans`",
    shares_weights=True, fine_tunes=True, coding="huffman", prunes_first=True, remarks=shared_remarks))
