"""Peak memory of loading a large Llama from disk, streamed, with and without quantize="nf4".

    PYTHONPATH=. python -m benchmarks.load_memory                     # Llama-3.1-8B shape, on CUDA
    PYTHONPATH=. python -m benchmarks.load_memory --preset llama3.2-1b --layers 4 --device cpu

It writes a random-weight checkpoint of the preset's shape (bf16, 2 GB safetensors shards with an
index, as HF checkpoints come) without ever holding the whole model, then loads it in a fresh
process per mode and reports: load time, peak and final memory (GPU: torch.cuda max/now allocated;
CPU: anonymous RSS, sampled every 2 ms, so page cache of the memory-mapped checkpoint does not
count; freed CPU memory is not always returned to the OS, so final includes some of the
allocator's slack), against the size of the loaded model and of its largest single tensor.
Streaming works when peak - final stays near one tensor rather than the whole model.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

GiB = 1024 ** 3


def write_checkpoint(folder: Path, cfg, shard_bytes: int = 2 * GiB, device: str = "cpu"):
    """A random bf16 checkpoint of cfg's shape, one tensor at a time."""
    from safetensors.torch import save_file

    from models import Llama
    from models.save import atomic_write
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Llama(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        del shapes["lm_head.weight"]
    shard, size, weight_map, count = {}, 0, {}, 0
    names = []

    def flush():
        nonlocal shard, size, count
        count += 1
        name = f"model-{count:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        names.append(name)
        shard, size = {}, 0

    for key, shape in shapes.items():
        t = torch.ones(shape, dtype=torch.bfloat16) if key.endswith("norm.weight") else \
            (torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02).cpu()
        nbytes = t.numel() * 2
        if shard and size + nbytes > shard_bytes:
            flush()
        shard[key] = t
        size += nbytes
    flush()
    index = {"metadata": {"total_size": sum(v[0] * (v[1] if len(v) > 1 else 1) * 2 for v in shapes.values())},
             "weight_map": weight_map}
    atomic_write(folder / "model.safetensors.index.json", lambda tmp: tmp.write_text(json.dumps(index)))
    atomic_write(folder / "config.json", lambda tmp: tmp.write_text(json.dumps(cfg.to_hf_config())))


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(folder: Path, device: str, quantize: str | None) -> dict:
    """Load once in this process and report times and memory (run in a fresh process)."""
    from models import Llama
    if quantize:
        import quant  # noqa: F401  (imported before the baseline: its import is not the load's memory)
    peak_anon = [_rss_anon()]
    baseline_anon = peak_anon[0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], _rss_anon())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    start = time.perf_counter()
    model = Llama.from_pretrained(folder, dtype=torch.bfloat16, device=device, quantize=quantize)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    model_bytes = sum(t.numel() * t.element_size() for t in
                      {id(t): t for t in list(model.parameters()) + list(model.buffers())}.values())
    largest = max(p.numel() for p in model.parameters()) * 2  # in bf16, as read
    result = {"mode": quantize or "bf16", "device": device, "load_s": round(seconds, 1),
              "model_GiB": model_bytes / GiB, "largest_tensor_GiB": largest / GiB,
              "cpu_peak_anon_GiB": (peak_anon[0] - baseline_anon) / GiB,
              "cpu_final_anon_GiB": (_rss_anon() - baseline_anon) / GiB}
    if cuda:
        result["gpu_peak_GiB"] = (torch.cuda.max_memory_allocated() - base_gpu) / GiB
        result["gpu_final_GiB"] = (torch.cuda.memory_allocated() - base_gpu) / GiB
    ids = torch.randint(0, model.config.vocab_size, (1, 16), device=device)
    with torch.no_grad():
        result["forward_finite"] = bool(torch.isfinite(model(ids).float()).all())
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama3.1-8b")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dir", default="/tmp/load_memory_checkpoint")
    parser.add_argument("--modes", default="nf4,bf16", help="comma-separated: nf4, bf16")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: one mode, this process
    args = parser.parse_args()
    folder = Path(args.dir)
    if args.measure is not None:
        print(json.dumps(measure(folder, args.device, None if args.measure == "bf16" else args.measure)))
        return

    from models import LlamaConfig
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    cfg = LlamaConfig.preset(args.preset, **overrides)
    marker = folder / "config.json"
    if not marker.is_file() or json.loads(marker.read_text()) != cfg.to_hf_config():
        start = time.perf_counter()
        write_checkpoint(folder, cfg, device=args.device)
        print(f"wrote a random {args.preset} checkpoint ({cfg.num_hidden_layers} layers) to {folder} "
              f"in {time.perf_counter() - start:.0f} s")
    rows = []
    for mode in args.modes.split(","):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                        os.environ.get("PYTHONPATH")])))
        out = subprocess.run([sys.executable, "-m", "benchmarks.load_memory", "--dir", str(folder), "--device",
                              args.device, "--measure", mode], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(f"{mode}: failed\n{out.stderr[-3000:]}")
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    keys = ["mode", "device", "load_s", "model_GiB", "largest_tensor_GiB", "gpu_peak_GiB", "gpu_final_GiB",
            "cpu_peak_anon_GiB", "cpu_final_anon_GiB", "forward_finite"]
    keys = [k for k in keys if any(k in r for r in rows)]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.2f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys) + " |")


if __name__ == "__main__":
    main()
