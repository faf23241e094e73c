"""Quantization: uniform fixed point (PTQ, QAT, per-layer bits), INT8 through ONNX
Runtime, k-means weight sharing, Huffman coding and the encoded payload that sizes them."""

from mcp.quantization.codec import Codebook, Uniform, decode, decode_into, encode, encode_model
from mcp.quantization.engine import METHODS, QuantSpec, Quantizer, layer_table

__all__ = ["METHODS", "Codebook", "QuantSpec", "Quantizer", "Uniform", "decode", "decode_into", "encode",
           "encode_model", "layer_table"]
