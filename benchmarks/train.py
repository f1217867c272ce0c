"""QLoRA training throughput and peak memory: ours against HF transformers + PEFT + bitsandbytes.

    PYTHONPATH=. python3 -m benchmarks.train                      # the table of issue 7 (GPU)
    PYTHONPATH=. python3 -m benchmarks.train --shapes llama3.2-1b:4 --steps 4

Each run is its own process (clean memory peak): random-weight Llama shapes, NF4 + double quant,
LoRA r=16 alpha=32 on all seven linear kinds, gradient checkpointing, seq 2048, random tokens,
bf16 autocast, clipping at 1.0, paged AdamW (32-bit states). Ours goes through the trainer's own
`lora.train.training_step`, with CUDA graphs, the embeddings and head in host memory and the
checkpointed activations offloaded, as the trainer's defaults are (--eager adds a run without
graphs, --resident one with everything on the GPU). Tokens/s = batch * seq / median step time; peak = `torch.cuda.max_memory_allocated`
over warm-up (graph capture included: a replay allocates nothing) and timed steps; reserved =
`max_memory_reserved` over the same span (what the caching allocator held).
The peer runs benchmarks/train_peer.py; bitsandbytes must be importable (carry its wheel).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.qlora_model import random_qlora_llama
from benchmarks.report import publish

ROOT = Path(__file__).resolve().parent.parent


def ours(args: dict) -> dict:
    import lora
    import lora.loss
    import lora.optim
    import models
    from lora.data import Batch
    from lora.graphs import StepGraphs
    from lora.train import training_step

    if args.get("loss_chunk"):
        lora.loss.CHUNK = args["loss_chunk"]
    model = random_qlora_llama(args["shape"])
    cfg = model.config
    model.gradient_checkpointing = True
    if args.get("host", True):  # as the trainer does by default (models/offload.py)
        models.keep_embeddings_on_host(model)
        model.model.checkpoint_offload = models.CheckpointOffload()
        torch.cuda.empty_cache()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = lora.optim.AdamW(params, lr=2e-4, paged=args.get("paged", True))
    B, T = args["batch"], args["seq"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    batch = Batch(input_ids=ids, labels=ids.clone(), position_ids=torch.arange(T).expand(B, T).contiguous(),
                  document_ids=torch.zeros(B, T, dtype=torch.long))
    device = torch.device("cuda")

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16)

    graphs = StepGraphs(model, optimizer, torch.bfloat16) if args.get("graphs", True) else None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()  # peaks of training, warm-up and graph capture included
    for _ in range(args["warmup"]):
        training_step(model, params, optimizer, [batch], 2e-4, 1.0, device, autocast, graphs)
    torch.cuda.synchronize()
    times = []
    for _ in range(args["steps"]):
        t0 = time.perf_counter()
        metrics = training_step(model, params, optimizer, [batch], 2e-4, 1.0, device, autocast, graphs)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    paged = "paged" if args.get("paged", True) else "unpaged"
    mode = "CUDA graphs" if graphs is not None and graphs.replays else "eager"
    mode += "" if args.get("host", True) else ", all on the GPU"
    chunk = f", loss chunk {lora.loss.CHUNK}" if args.get("loss_chunk") else ""
    return {"impl": f"ours ({paged} AdamW, {mode}{chunk})", "step_s": median, "tokens_per_s": B * T / median,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "loss": metrics["loss"]}


def spawn(kind: str, args: dict) -> dict:
    """Run one configuration in a fresh process and return its result line."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if kind == "peer":  # no repository on the path: our `kernels` must not shadow PyPI's
        env["PYTHONPATH"] = os.pathsep.join(p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                             if p and Path(p).resolve() != ROOT)
        cmd = [sys.executable, str(ROOT / "benchmarks" / "train_peer.py"), json.dumps(args)]
        cwd = "/tmp"
    else:
        cmd = [sys.executable, "-m", "benchmarks.train", "--worker", json.dumps(args)]
        cwd = str(ROOT)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=args.get("timeout", 900))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-8:]
    return {"error": " | ".join(tail) or f"exit code {proc.returncode}"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--shapes", default="llama3.2-1b:4,llama3.1-8b:1",
                        help="comma-separated preset:batch pairs")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peer-recipes", default="bf16", help="comma-separated: bf16, tutorial; empty for none")
    parser.add_argument("--unpaged", action="store_true", help="also run ours with the unpaged optimizer")
    parser.add_argument("--eager", action="store_true", help="also run ours without CUDA graphs")
    parser.add_argument("--resident", action="store_true",
                        help="also run ours with the embeddings, head and checkpoints on the GPU")
    parser.add_argument("--loss-chunks", default="", help="comma-separated: also run ours with these loss chunks")
    args = parser.parse_args(argv)
    if args.worker:
        try:
            result = ours(json.loads(args.worker))
        except torch.cuda.OutOfMemoryError as e:
            result = {"error": f"out of memory: {str(e).splitlines()[0]}"}
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    import models
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"python {sys.version.split()[0]}", flush=True)
    rows = []
    for item in args.shapes.split(","):
        shape, batch = item.split(":")
        base = {"shape": shape, "batch": int(batch), "seq": args.seq, "steps": args.steps, "warmup": args.warmup}
        runs = [("ours", base)]
        if args.unpaged:
            runs.append(("ours", base | {"paged": False}))
        if args.eager:
            runs.append(("ours", base | {"graphs": False}))
        if args.resident:
            runs.append(("ours", base | {"host": False}))
        for chunk in filter(None, args.loss_chunks.split(",")):
            runs.append(("ours", base | {"loss_chunk": int(chunk)}))
        hf_config = models.LlamaConfig.preset(shape).to_hf_config()
        for recipe in filter(None, args.peer_recipes.split(",")):
            runs.append(("peer", base | {"hf_config": hf_config, "recipe": recipe}))
        for kind, run_args in runs:
            t0 = time.time()
            result = spawn(kind, run_args)
            result.update(shape=shape, batch=int(batch), wall_s=time.time() - t0)
            print(json.dumps(result), flush=True)
            rows.append(result)

    # The last step's loss (the same batch every step, so it falls as the batch is learned): rows of
    # one shape that train the same model must land close together, a check on the gradients.
    lines = ["| shape, batch | implementation | tokens/s | peak GiB | reserved GiB | vs peer tokens/s "
             "| vs peer memory | last loss |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        peer = next((r for r in rows if r["shape"] == row["shape"] and r.get("impl", "").startswith("hf")
                     and "error" not in r), None)
        if "error" in row:
            lines.append(f"| {row['shape']}, {row['batch']} | {row.get('impl', '?')} | {row['error'][:80]} | | | | | |")
            continue
        speed = f"{row['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if peer else "-"
        memory = f"{row['peak_gib'] / peer['peak_gib']:.2f}x" if peer else "-"
        lines.append(f"| {row['shape']}, {row['batch']} | {row['impl']} | {row['tokens_per_s']:,.0f} | "
                     f"{row['peak_gib']:.2f} | {row['reserved_gib']:.1f} | {speed} | {memory} | {row['loss']:.3f} |")
    table = "\n".join(lines)
    publish("train", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
