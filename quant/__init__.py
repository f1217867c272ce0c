"""NF4 quantization with double quantization, and a 4-bit linear layer (bitsandbytes layout)."""
