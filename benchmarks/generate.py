"""Decoding speed: greedy generation from a random-weight NF4 Llama with LoRA adapters, each step
launched eagerly from Python or replayed from a CUDA graph (models/generate.py).

    PYTHONPATH=. python3 -m benchmarks.generate [--shapes llama3.2-1b,llama3.1-8b] [--new 128] [--layout rows]

bf16 autocast, batch 1, a prompt of --prompt random tokens then --new tokens (no stop token);
time per new token = (wall time of the call - the same call with 2 new tokens) / (new - 2), so the
prompt, the graph's capture and its first replay are not counted. Also with the embeddings and head in host memory
(the trainer's default on the GPU; the head then crosses PCIe once per token).
Wall time per token includes the host's work between steps (the sampled token back to the host, the
next embedding), which spread over 2.3-4.5 ms per token at 1B for one config in one process (run 132
of benchmarks/RESULTS.md). "step GPU ms" is the GPU alone: the captured step replayed back to back,
with no host work in between (stable to 0.1 ms, run 133); compare kernels with it.
"""
import argparse
import sys
import time

import torch

from benchmarks.qlora_model import random_qlora_llama
from benchmarks.report import publish


def step_gpu_ms(model, prompt: list[int], replays: int = 200) -> float:
    """GPU time of one decoding step: models/generate.py's captured step (after `prompt` in a KV cache),
    replayed `replays` times back to back between two CUDA events."""
    from models.generate import GraphedDecoder
    cache = model.new_kv_cache(1, len(prompt) + 2)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.model(torch.tensor([prompt], device=model.model.embed_tokens.weight.device), kv_cache=cache)
        decoder = GraphedDecoder(model, cache, first_position=cache.length)
    for _ in range(20):
        decoder.graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        decoder.graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="llama3.2-1b,llama3.1-8b")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--layout", choices=("tiles", "rows"), default="tiles",
                        help="the 4-bit codes in the kernels' tile order (Linear4bit's default on a GPU) or in "
                             "bitsandbytes' row order (quant.tile_codes(model, False))")
    args = parser.parse_args(argv)

    import models
    import quant

    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, python {sys.version.split()[0]}, "
          f"codes in {args.layout}")
    lines = ["| shape | embeddings and head | eager ms/token | CUDA graph ms/token | speedup | step GPU ms |",
             "|---|---|---|---|---|---|"]
    for shape in args.shapes.split(","):
        model = random_qlora_llama(shape)
        quant.tile_codes(model, args.layout == "tiles")
        cfg = model.config
        prompt = torch.randint(0, cfg.vocab_size, (args.prompt,)).tolist()
        for where in ("GPU", "host"):
            if where == "host":
                models.keep_embeddings_on_host(model)
                torch.cuda.empty_cache()
            per_token = {}
            for graph in (False, True):
                def call(n):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        out = models.generate_ids(model, prompt, max_new_tokens=n, cuda_graph=graph)
                    torch.cuda.synchronize()
                    assert len(out) == n
                    return time.perf_counter() - t0
                call(args.new)  # warm-up: autotuning, allocator
                base = min(call(2) for _ in range(3))
                full = min(call(args.new) for _ in range(2))
                per_token[graph] = (full - base) / (args.new - 2) * 1e3
                print(f"{shape} {where} graph={graph}: {per_token[graph]:.2f} ms/token", flush=True)
            model.eval()
            step = step_gpu_ms(model, prompt)
            print(f"{shape} {where} step on the GPU: {step:.3f} ms", flush=True)
            lines.append(f"| {shape} | {where} | {per_token[False]:.2f} | {per_token[True]:.2f} | "
                         f"{per_token[False] / per_token[True]:.2f}x | {step:.2f} |")
        del model
        torch.cuda.empty_cache()
    publish("generate", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
