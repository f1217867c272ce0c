"""Where a QLoRA training step spends its time: torch.profiler over our step (GPU).

    PYTHONPATH=. python3 -m benchmarks.profile_train [--shape llama3.1-8b] [--batch 1] [--seq 2048]

Builds the same random-weight model as benchmarks/train.py (the trainer's defaults: embeddings,
head and checkpoints in host memory; --resident keeps them on the GPU), runs two warm-up steps
eagerly, profiles two, and prints the kernels by total GPU time, the number of kernel launches
per step, the step's GPU-busy fraction (the rest is the GPU waiting for the host), and the
operators by host time.
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.qlora_model import random_qlora_llama


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llama3.1-8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=30, help="kernels to list")
    parser.add_argument("--resident", action="store_true", help="embeddings, head and checkpoints on the GPU")
    args = parser.parse_args()

    import lora
    import lora.optim
    import models
    from lora.data import Batch
    from lora.train import training_step

    model = random_qlora_llama(args.shape)
    cfg = model.config
    model.gradient_checkpointing = True
    if not args.resident:
        models.keep_embeddings_on_host(model)
        model.model.checkpoint_offload = models.CheckpointOffload()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = lora.optim.AdamW(params, lr=2e-4, paged=True)
    B, T = args.batch, args.seq
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    batch = Batch(ids, ids.clone(), torch.arange(T).expand(B, T).contiguous(), torch.zeros(B, T, dtype=torch.long))
    device = torch.device("cuda")

    def step():
        return training_step(model, params, optimizer, [batch], 2e-4, 1.0, device,
                             lambda: torch.autocast("cuda", dtype=torch.bfloat16))

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 2
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or e.self_device_time_total > 0]
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy = sum(e.device_time for e in kernels if hasattr(e, "device_time")) / 2 / 1e6
    print(f"{args.shape} batch {args.batch} seq {args.seq}: {wall * 1e3:.1f} ms per step (profiled), "
          f"{len(kernels) / 2:.0f} kernel launches per step, GPU busy {busy * 1e3:.1f} ms per step")
    rows = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:args.rows]
    print("\n| kernel | calls/step | GPU ms/step | share |\n|---|---|---|---|")
    total = sum(e.self_device_time_total for e in events)
    for e in rows:
        print(f"| {e.key[:70]} | {e.count / 2:.0f} | {e.self_device_time_total / 2 / 1e3:.2f} | "
              f"{100 * e.self_device_time_total / max(total, 1):.1f}% |")
    host = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    print("\n| operator | calls/step | host ms/step (self) |\n|---|---|---|")
    for e in host:
        print(f"| {e.key[:70]} | {e.count / 2:.0f} | {e.self_cpu_time_total / 2 / 1e3:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
