"""Han et al.'s Deep Compression: prune, k-means weight sharing, Huffman coding."""

from mcp.quantization.methods import QuantMethod, register_quant_method
from mcp.quantization.methods._grid import shared_remarks

register_quant_method(QuantMethod(
    name="deep_compression",
    summary="Han et al. in one command: the prune stage (nested run: `--sparsity` 0.965, `--prune-schedule "
            "gradual`, `--prune-epochs` 160), then `kmeans` (without `--bits`: 8 bits for convolutions and 4 for "
            "fully connected layers; `--share-biases auto`; 30 `--epochs`), then Huffman, with the size after each stage",
    deployed_as="as `kmeans`",
    shares_weights=True, fine_tunes=True, coding="huffman", prunes_first=True, remarks=shared_remarks,
    # Han et al. keep 8 bits in convolutions, which lose accuracy first, and use 4-6 in fully connected
    # layers; 4 lost nothing measurable on LeNet-300-100 (README's Results)
    default_bits=(8, 4), default_epochs=30))
