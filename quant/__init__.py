"""NF4 quantization with double quantization, and a 4-bit linear layer (bitsandbytes layout).

    packed, state = quant.quantize_4bit(w, blocksize=64, double_quant=True, quant_type="nf4")
    w2 = quant.dequantize_4bit(packed, state)
    layer = quant.Linear4bit.from_linear(linear)        # or Linear4bit.from_weight(w, bias)
    quant.quantize(model, skip=("lm_head",))            # every nn.Linear -> Linear4bit, in place
    quant.tile_codes(model, False)                      # codes in bitsandbytes' row order on the GPU too
"""
from .codebooks import FP4_CODE, NF4_CODE
from .linear import Linear4bit
from .nf4 import QuantState, dequantize_4bit, quantize_4bit
from .quantize import quantize, tile_codes

__all__ = [
    "quantize_4bit", "dequantize_4bit", "QuantState", "NF4_CODE", "FP4_CODE", "Linear4bit",
    "quantize", "tile_codes",
]
