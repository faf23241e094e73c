"""k-means weight sharing, then Huffman coding of the payload."""

from mcp.quantization.methods import QuantMethod, register_quant_method
from mcp.quantization.methods._grid import shared_remarks

register_quant_method(QuantMethod(
    name="huffman",
    summary="`kmeans`, then Huffman coding of the indices and of the sparse gaps",
    deployed_as="as `kmeans`",
    shares_weights=True, fine_tunes=True, coding="huffman", remarks=shared_remarks))
