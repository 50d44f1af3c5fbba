"""GGML block quant formats: bytes in, tensors out (and float tensors back to bytes)."""

from pipeload.quant.formats import dequantize, quantize
from pipeload.quant.registry import (
    QK_K,
    QuantFormat,
    format_for,
    quant_type_name,
    row_nbytes,
    supported_qtypes,
    tensor_nbytes,
)

__all__ = [
    "QK_K",
    "QuantFormat",
    "dequantize",
    "format_for",
    "quant_type_name",
    "quantize",
    "row_nbytes",
    "supported_qtypes",
    "tensor_nbytes",
]
