"""The benchmarks' model: a random-weight Llama preset on CUDA in bf16, NF4 + double quant on
every linear layer but the head, LoRA on all of them (benchmarks/train.py, profile_train.py,
generate.py build the same one; benchmarks/train_peer.py has its own, since it must not import
this repository)."""
import torch

__all__ = ["random_qlora_llama"]


def random_qlora_llama(shape: str, r: int = 16, alpha: float = 32):
    """models.Llama of preset `shape`, seeded 0, quantized (quant.quantize) and wrapped (lora.wrap)."""
    import lora
    import models
    import quant

    cfg = models.LlamaConfig.preset(shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        model = models.Llama(cfg)
        torch.set_default_dtype(previous)
    quant.quantize(model, compute_dtype=torch.bfloat16)
    torch.cuda.empty_cache()  # the bf16 weights quantize left behind
    lora.wrap(model, r=r, alpha=alpha)
    return model
