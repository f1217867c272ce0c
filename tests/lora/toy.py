"""Small hand-made models for LoRA tests: no Llama, just nn.Modules with familiar names."""
import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=True)
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):  # (B, d) -> (B, d)
        h = self.norm(x + self.q_proj(x) * torch.sigmoid(self.v_proj(x)))
        return h + self.down(torch.relu(self.up(h)))


class ToyLM(nn.Module):
    """Embedding, two blocks and an output head named lm_head."""

    def __init__(self, vocab: int = 50, d: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):  # (B,) int64 -> (B, vocab)
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.lm_head(h)


def randomize_adapters(model: nn.Module, std: float = 0.1) -> None:
    """B starts at zero; tests give every adapter (and DoRA magnitude) non-trivial values."""
    from lora import lora_layers

    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.weight.normal_(0, std)
            layer.lora_B.weight.normal_(0, std)
            if layer.lora_magnitude_vector is not None:
                layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand_like(layer.lora_magnitude_vector))
