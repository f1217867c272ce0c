"""Quantization error of NF4, FP4 and int4 on N(0, 1) weights, and bits per parameter (CPU).

    python -m benchmarks.quant_error [--rows 4096] [--cols 4096] [--blocksize 64] [--seed 0]

Prints a markdown table (the one in docs/quantization.md). All formats use blocks of `blocksize`
with one absmax each; int4 is symmetric absmax rounding to the 15 levels -7..7 (x ~ q * absmax / 7).
Bits per parameter are measured from the tensors of a real `quant.Linear4bit`.
"""
import argparse

import torch

import quant


def int4_roundtrip(w: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Symmetric absmax int4: q = round(7 x / absmax) in [-7, 7], x ~ q * absmax / 7."""
    blocks = w.reshape(-1, blocksize).float()
    scale = blocks.abs().amax(dim=1, keepdim=True) / 7
    return (torch.round(blocks / scale).clamp(-7, 7) * scale).view(w.shape)


def four_bit_roundtrip(w, blocksize, quant_type, double_quant):
    packed, state = quant.quantize_4bit(w, blocksize, double_quant, quant_type)
    return quant.dequantize_4bit(packed, state)


def bits_per_parameter(double_quant: bool, blocksize: int, n: int = 1024) -> float:
    layer = quant.Linear4bit(n, n, bias=False, blocksize=blocksize, double_quant=double_quant,
                             compute_dtype=torch.float32)
    tensors = [layer.weight, layer.absmax] + ([layer.nested_absmax] if double_quant else [])
    return 8 * sum(t.numel() * t.element_size() for t in tensors) / (n * n)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    w = torch.randn(args.rows, args.cols)
    bs = args.blocksize
    rows = [
        ("NF4 + double quant", lambda: four_bit_roundtrip(w, bs, "nf4", True),
         bits_per_parameter(True, bs)),
        ("NF4", lambda: four_bit_roundtrip(w, bs, "nf4", False), bits_per_parameter(False, bs)),
        ("FP4 (bitsandbytes)", lambda: four_bit_roundtrip(w, bs, "fp4", False),
         bits_per_parameter(False, bs)),
        ("int4 (symmetric absmax)", lambda: int4_roundtrip(w, bs), 4 + 32 / bs),
    ]
    print(f"N(0, 1) weights, {args.rows} x {args.cols}, blocksize {bs}, seed {args.seed}\n")
    print("| format | bits / parameter | mean squared error | max abs error |")
    print("|---|---|---|---|")
    for name, roundtrip, bits in rows:
        err = roundtrip() - w
        print(f"| {name} | {bits:.3f} | {err.pow(2).mean().item():.5f} | {err.abs().max().item():.4f} |")


if __name__ == "__main__":
    main()
