"""lora.graphs without a GPU: what it refuses, and the trainer leaving it off on the CPU.
The replay itself is tested on CUDA in test_graphs_gpu.py."""
import pytest
import torch
import torch.nn as nn

import lora.optim
from lora.config import Config, apply_overrides
from lora.graphs import StepGraphs


def test_graphs_refuse_a_torch_optimizer_and_cpu_parameters():
    model = nn.Linear(3, 3)
    with pytest.raises(TypeError, match="lora.optim.AdamW"):
        StepGraphs(model, torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="CUDA"):
        StepGraphs(model, lora.optim.AdamW(model.parameters()))


def test_the_config_switches():
    assert Config().cuda_graphs and Config().host_embeddings and Config().offload_checkpoints
    for name in ("cuda_graphs", "host_embeddings", "offload_checkpoints"):
        assert not getattr(apply_overrides(Config(), {name: False}), name)
