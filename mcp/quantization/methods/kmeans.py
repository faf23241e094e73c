"""Deep Compression's weight sharing: a k-means codebook per layer."""

from mcp.quantization.methods import QuantMethod, register_quant_method
from mcp.quantization.methods._grid import shared_remarks

register_quant_method(QuantMethod(
    name="kmeans",
    summary="Deep Compression weight sharing: 2^bits centroids per layer (`--kmeans-init "
            "forgy\\|density\\|linear`), centroids fine-tuned by gradient for `--epochs`; `--share-biases` gives "
            "biases their own codebooks (`auto`, the default: where their float32 bytes would be more than 5% of "
            "the encoded weights')",
    deployed_as="float32 weights holding the shared values",
    shares_weights=True, fine_tunes=True, remarks=shared_remarks))
