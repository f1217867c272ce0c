"""Triton kernels for NF4: dequantization and fused dequant-matmul. Imported only where used."""
