"""The trainer: QLoRA fine-tuning of a Llama-family model, end to end.

    python -m lora.train run.toml [--field value ...]        or     lora.train.run(Config(...))

config -> models.Llama.from_pretrained(quantize="nf4") -> lora.wrap -> on GPU, the frozen
embeddings and head and the checkpointed activations in host memory (models/offload.py) ->
lora.data (template, masks, packing) -> steps: bf16 autocast on GPU (fp32 on CPU), CUDA graphs of
each micro-batch's forward and backward (lora/graphs.py), gradient checkpointing, accumulation,
warmup + cosine schedule, clipping, lora.optim.AdamW (paged on GPU) -> periodic eval loss and
sample answers -> atomic checkpoints that resume exactly -> the adapter in the PEFT layout, and
optionally a merged HF-format folder.

This is the one module that knows all four packages.
"""
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import lora
import lora.optim
import models
from lora.config import Config, apply_overrides, load_config, parse_args
from lora.data import (
    IGNORE, Batch, DataStats, pack, pad_rows, read_jsonl, split_eval, tokenize, unpacked,
)
from lora.graphs import PAD_MULTIPLE, StepGraphs
from lora.io import plain_mode
from lora.loss import loss_sum
from models.jsonfile import read_json_object

__all__ = ["Config", "run", "main", "learning_rate", "Trainer", "training_step", "loss_sum"]


def learning_rate(config: Config, step: int, total_steps: int) -> float:
    """Linear warmup over `warmup_steps`, then cosine (or linear) decay to min_lr_ratio * lr."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    span = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr_ratio * config.lr
    if config.schedule == "linear":
        return floor + (config.lr - floor) * (1.0 - progress)
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _device(config: Config) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("config device is 'cuda' but this machine has no CUDA device")
    return device


def _dtype(config: Config, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, config.dtype)


def resolve_model_path(name: str) -> Path:
    """A path to load; the name 'smollm2-135m' fetches the real model into .cache/models once."""
    if name.lower() in ("smollm2-135m", "smollm2-135m-instruct"):
        return models.fetch_smollm2()
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    return path


def training_step(model, params, optimizer, batches: list[Batch], lr: float, max_grad_norm: float,
                  device: torch.device, autocast, graphs: StepGraphs | None = None) -> dict:
    """One optimizer step over `batches` (gradient accumulation): the loss is the mean over every
    trained token of all of them; gradients are clipped to max_grad_norm; `autocast()` gives the
    autocast context. With `graphs` (CUDA), each micro-batch's forward and backward replays a
    captured CUDA graph (lora/graphs.py). Returns loss, lr, grad_norm and the number of tokens."""
    model.train()
    n_trained = sum(int((b.labels[:, 1:] != IGNORE).sum()) for b in batches)
    total = torch.zeros((), device=device)
    for batch in batches:
        if graphs is not None:
            total += graphs.forward_backward(batch, 1.0 / max(n_trained, 1))
            continue
        loss = loss_sum(model, batch, device, autocast()) / max(n_trained, 1)
        loss.backward()
        total += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad()
    tokens = sum(int((b.document_ids >= 0).sum()) for b in batches)
    return {"loss": float(total), "lr": lr, "grad_norm": float(grad_norm), "tokens": tokens}


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint (trainer_state.json)."""
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed
    tokens_seen: int = 0
    skipped_steps: int = 0


class Trainer:
    """Holds the model, data and optimizer of one run. `run(config)` is the whole job."""

    def __init__(self, config: Config, log=print):
        self.config = config.validate()
        self.log = log
        self.out = Path(config.output_dir)
        self.device = _device(config)
        self.dtype = _dtype(config, self.device)
        torch.manual_seed(config.seed)

        path = resolve_model_path(config.model)
        quantize = None if config.quantize == "none" else config.quantize
        t0 = time.time()
        host = config.host_embeddings and self.device.type == "cuda"  # models/offload.py
        self.model = models.Llama.from_pretrained(path, dtype=self.dtype, device=self.device, quantize=quantize,
                                                  host_embeddings=host)
        self.model.name_or_path = str(config.model)
        self.tok = models.Tokenizer.from_pretrained(path)
        self.log(f"loaded {path} ({quantize or self.dtype}) in {time.time() - t0:.1f}s")
        targets = "all-linear" if config.targets == ["all-linear"] else config.targets
        lora.wrap(self.model, r=config.r, alpha=config.alpha, dropout=config.dropout, targets=targets,
                  use_rslora=config.use_rslora, use_dora=config.use_dora)
        self.model.gradient_checkpointing = config.gradient_checkpointing
        if self.device.type == "cuda" and config.offload_checkpoints and config.gradient_checkpointing:
            self.model.model.checkpoint_offload = models.CheckpointOffload()  # models/offload.py
        self.log(str(lora.trainable_parameters(self.model)))

        self.stats = DataStats()
        examples = read_jsonl(config.data)
        train, held = split_eval(examples, config.eval_fraction, config.seed)
        train_ex = tokenize(train, self.tok, config.max_length, self.stats)
        eval_ex = tokenize(held, self.tok, config.max_length, self.stats)
        arrange = (lambda ex: pack(ex, config.max_length)) if config.packing else unpacked
        self.train_rows, self.eval_rows = arrange(train_ex), arrange(eval_ex)
        self.log(f"data: {len(train)} train / {len(held)} eval examples, {len(self.train_rows)} train rows, "
                 f"{self.stats.truncated} truncated to {config.max_length} tokens")

        batches_per_epoch = math.ceil(len(self.train_rows) / config.batch_size)
        self.steps_per_epoch = max(1, batches_per_epoch // config.grad_accum)
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * self.steps_per_epoch))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = lora.optim.AdamW(
            self.params, lr=config.lr, weight_decay=config.weight_decay,
            state_bits=config.optimizer_bits, paged=config.paged and self.device.type == "cuda",
        )
        use_graphs = config.cuda_graphs and self.device.type == "cuda"
        self.graphs = StepGraphs(self.model, self.optimizer, self._autocast_dtype(), log=log) if use_graphs else None
        self.progress = Progress()
        self.history: list[dict] = []
        self._order: tuple[int, list[int]] | None = None  # (epoch, row order), see _epoch_order

    # ---- data order -------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> list[int]:
        """The row order of an epoch, drawn from the seed once per epoch (not per micro-batch)."""
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.config.seed * 100003 + epoch)
            self._order = (epoch, torch.randperm(len(self.train_rows), generator=g).tolist())
        return self._order[1]

    def _next_batch(self) -> Batch:
        """The next micro-batch of rows; epochs reshuffle deterministically from the seed."""
        p, size = self.progress, self.config.batch_size
        if p.batch_in_epoch * size >= len(self.train_rows):
            p.epoch, p.batch_in_epoch = p.epoch + 1, 0
        order = self._epoch_order(p.epoch)
        picked = order[p.batch_in_epoch * size:(p.batch_in_epoch + 1) * size]
        p.batch_in_epoch += 1
        rows = [self.train_rows[i] for i in picked]
        length = max(len(r.ids) for r in rows)
        if self.graphs is not None:  # a few shapes, so a few graphs (lora/graphs.py)
            length = max(length, min(-(-length // PAD_MULTIPLE) * PAD_MULTIPLE, self.config.max_length))
        return pad_rows(rows, length, self.tok.pad_id)

    # ---- one step ---------------------------------------------------------------------------
    def _autocast_dtype(self) -> torch.dtype | None:
        """bf16/fp16 autocast on CUDA; None (no autocast) on the CPU or in float32."""
        cuda = self.device.type == "cuda" and self.dtype in (torch.bfloat16, torch.float16)
        return self.dtype if cuda else None

    def _autocast(self):
        dtype = self._autocast_dtype()
        return torch.autocast(self.device.type, dtype=dtype or self.dtype, enabled=dtype is not None)

    def _loss_sum(self, batch: Batch) -> torch.Tensor:
        return loss_sum(self.model, batch, self.device, self._autocast())

    def train_step(self) -> dict:
        batches = [self._next_batch() for _ in range(self.config.grad_accum)]
        lr = learning_rate(self.config, self.progress.step, self.total_steps)
        skipped_before = self.optimizer.skipped_steps
        metrics = training_step(self.model, self.params, self.optimizer, batches, lr,
                                self.config.max_grad_norm, self.device, self._autocast, self.graphs)
        self.progress.step += 1
        self.progress.skipped_steps += self.optimizer.skipped_steps - skipped_before
        self.progress.tokens_seen += metrics["tokens"]
        return metrics

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss per trained token over the held-out rows."""
        if not self.eval_rows:
            return None
        self.model.eval()
        total, count = 0.0, 0
        size = self.config.batch_size
        for start in range(0, len(self.eval_rows), size):
            rows = self.eval_rows[start:start + size]
            batch = pad_rows(rows, max(len(r.ids) for r in rows), self.tok.pad_id)
            total += float(self._loss_sum(batch))
            count += int((batch.labels[:, 1:] != -100).sum())
        return total / max(count, 1)

    @torch.no_grad()
    def samples(self) -> list[tuple[str, str]]:
        self.model.eval()
        answers = []
        for prompt in self.config.samples:
            with self._autocast():
                text = models.generate(self.model, self.tok, [{"role": "user", "content": prompt}],
                                       max_new_tokens=self.config.sample_tokens)
            answers.append((prompt, text))
        return answers

    # ---- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """checkpoints/step-NNNNNN/: adapter, optimizer, progress, RNG; written whole or not at all, with
        the modes of plain open() and mkdir() calls."""
        root = self.out / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.progress.step:06d}"
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        try:
            lora.save(self.model, tmp, base_model_name_or_path=str(self.config.model))
            lora.optim.save_state(self.optimizer, tmp / "optimizer")
            rng = {"cpu": torch.get_rng_state()}
            if self.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.device)
            from safetensors.torch import save_file
            save_file(rng, tmp / "rng.safetensors")  # the folder is renamed whole below
            os.chmod(tmp / "rng.safetensors", plain_mode())  # save_file creates owner-only files
            state = {"progress": dataclasses.asdict(self.progress),
                     "config": dataclasses.asdict(self.config), "history": self.history}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
            os.chmod(tmp, plain_mode(directory=True))  # mkdtemp's folder is owner-only
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in sorted(root.glob("step-*"))[:-max(1, self.config.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def latest_checkpoint(self) -> Path | None:
        found = sorted((self.out / "checkpoints").glob("step-*"))
        return found[-1] if found else None

    def resume_from(self, folder: Path) -> None:
        from safetensors.torch import load_file
        lora.load(self.model, folder)
        lora.optim.load_state(self.optimizer, folder / "optimizer")
        path = folder / "trainer_state.json"
        state = read_json_object(path)
        try:
            self.progress = Progress(**state["progress"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: 'progress' is missing or malformed ({e})") from None
        self.history = state.get("history", [])
        rng = load_file(folder / "rng.safetensors")
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.log(f"resumed from {folder} at step {self.progress.step}")

    # ---- the loop ---------------------------------------------------------------------------
    def _record(self, entry: dict) -> None:
        self.history.append(entry)
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    def _eval_and_sample(self) -> float | None:
        loss = self.evaluate()
        entry = {"step": self.progress.step, "eval_loss": loss}
        for prompt, answer in self.samples():
            self.log(f"  sample | {prompt!r} -> {answer!r}")
            entry.setdefault("samples", []).append({"prompt": prompt, "answer": answer})
        if loss is not None:
            self.log(f"step {self.progress.step:>5} | eval loss {loss:.4f}")
        self._record(entry)
        return loss

    def fit(self) -> dict:
        c = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(c), indent=1) + "\n")
        if c.resume:
            checkpoint = self.latest_checkpoint()
            if checkpoint is None:
                self.log(f"--resume: no checkpoint in {self.out / 'checkpoints'}; starting fresh")
            else:
                self.resume_from(checkpoint)
        first_eval = self._eval_and_sample() if self.progress.step == 0 else None
        start, t_start, tokens_start = self.progress.step, time.time(), self.progress.tokens_seen
        while self.progress.step < self.total_steps:
            metrics = self.train_step()
            step = self.progress.step
            elapsed = time.time() - t_start
            tok_s = (self.progress.tokens_seen - tokens_start) / max(elapsed, 1e-9)
            eta = elapsed / (step - start) * (self.total_steps - step)
            entry = {"step": step, **metrics, "tokens_per_s": tok_s}
            if self.device.type == "cuda":
                entry["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            self._record(entry)
            if step % c.log_every == 0 or step == self.total_steps:
                mem = f" | mem {entry['gpu_mem_gib']:.1f} GiB" if "gpu_mem_gib" in entry else ""
                self.log(f"step {step:>5}/{self.total_steps} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} "
                         f"| {tok_s:,.0f} tok/s | ETA {_duration(eta)}{mem}")
            if c.eval_every and step % c.eval_every == 0 and step < self.total_steps:
                self._eval_and_sample()
            if c.save_every and step % c.save_every == 0 and step < self.total_steps:
                self.save_checkpoint()
        final_eval = self._eval_and_sample()
        self.save_checkpoint()
        adapter = lora.save(self.model, self.out / "adapter", base_model_name_or_path=str(c.model))
        result = {"first_eval_loss": first_eval, "final_eval_loss": final_eval, "steps": self.progress.step,
                  "adapter": str(adapter), "skipped_steps": self.progress.skipped_steps,
                  "truncated_examples": self.stats.truncated}
        if c.export_merged:
            result["merged"] = str(export_merged(self.model, self.tok, self.out / "merged", self.log))
        _plot_losses(self.history, self.out / "loss.png")
        return result


def export_merged(model, tok, folder: Path, log=print) -> Path:
    """An HF-format folder (config.json, safetensors, tokenizer) of the base with adapters folded in."""
    if any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        log("export: the 4-bit base is dequantized and the adapter folded in; quantizing this merged "
            "model again rounds the weights a second time (serve base + adapter to avoid that)")
    state = lora.merged_state_dict(model)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    dtype = model.model.embed_tokens.weight.dtype
    config = model.config.to_hf_config() | {"torch_dtype": str(dtype).removeprefix("torch.")}
    models.save_safetensors_folder(state, config, folder)
    tok.save_pretrained(folder)
    return folder


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _plot_losses(history: list[dict], path: Path) -> None:
    """A loss-curve PNG when matplotlib is installed (it is optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if h.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def run(config: Config, log=print) -> dict:
    """Fine-tune as `config` says; returns the eval losses and the paths written."""
    return Trainer(config, log=log).fit()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("fields:", ", ".join(f.name for f in dataclasses.fields(Config)))
        return 0
    try:
        path, overrides = parse_args(argv)
        config = load_config(path) if path else Config()
        config = apply_overrides(config, overrides, where="command line").validate()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run(config)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
