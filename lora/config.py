"""The trainer's configuration: one dataclass, read from TOML, any field overridable by a flag.

    python -m lora.train run.toml --lr 1e-4 --targets q_proj,v_proj --no-packing --resume

A TOML file holds top-level keys named as the fields below. Flags are `--field value` (lists
comma-separated), `--flag` / `--no-flag` for booleans. An unknown key or flag is an error that
names it (and the file), so a typo never trains with a silent default.
"""
import dataclasses
import difflib
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Config", "load_config", "apply_overrides", "parse_args"]


@dataclass
class Config:
    # model and adapters
    model: str = ""  # HF folder, .gguf file, bnb-4bit folder, or "smollm2-135m" (fetched once)
    quantize: str = "nf4"  # "nf4" or "none"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    use_rslora: bool = False
    use_dora: bool = False
    # data
    data: str = ""  # a JSONL file or a folder of them
    eval_fraction: float = 0.1
    max_length: int = 1024
    packing: bool = True
    # optimization
    lr: float = 2e-4
    schedule: str = "cosine"  # cosine | linear | constant, after warmup
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 4
    grad_accum: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optimizer_bits: int = 32  # 32 or 8
    paged: bool = True  # optimizer state in pinned CPU memory (CUDA only; no effect on CPU)
    gradient_checkpointing: bool = True
    cuda_graphs: bool = True  # replay each micro-batch's forward + backward as a CUDA graph (GPU only)
    host_embeddings: bool = True  # frozen embeddings and head in host memory, the head streamed (GPU only)
    offload_checkpoints: bool = True  # checkpointed layer inputs in host memory (GPU, with checkpointing)
    # evaluation, samples, checkpoints
    eval_every: int = 50  # steps; 0: only before and after training
    save_every: int = 100  # steps; 0: only at the end
    keep_checkpoints: int = 2
    samples: list[str] = field(default_factory=list)  # prompts answered at each eval
    sample_tokens: int = 48
    log_every: int = 1
    seed: int = 0
    output_dir: str = "out/run"
    resume: bool = False
    export_merged: bool = False
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float16 | float32

    def validate(self) -> "Config":
        problems = []
        if not self.model:
            problems.append("model is empty: give a model folder, a .gguf file or 'smollm2-135m'")
        if not self.data:
            problems.append("data is empty: give a JSONL file or a folder of them")
        if self.quantize not in ("nf4", "none"):
            problems.append(f"quantize must be 'nf4' or 'none', got {self.quantize!r}")
        if self.schedule not in ("cosine", "linear", "constant"):
            problems.append(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.optimizer_bits not in (8, 32):
            problems.append(f"optimizer_bits must be 8 or 32, got {self.optimizer_bits}")
        for name in ("r", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            problems.append(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            problems.append(f"dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        if problems:
            raise ValueError("invalid config: " + "; ".join(problems))
        return self


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)


def _unknown(name: str, where: str) -> ValueError:
    close = difflib.get_close_matches(name, list(_FIELDS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"{where}: unknown config field {name!r}{hint}")


def _convert(name: str, value, where: str):
    """Coerce a TOML value or a flag's string to the field's type."""
    kind = _HINTS[name]
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected true or false, got {value!r}")
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"expected an integer, got {value!r}")
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"expected an integer, got {value!r}") from None
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"expected a number, got {value!r}") from None
        if kind == list[str]:
            if isinstance(value, str):
                return [part.strip() for part in value.split(",") if part.strip()]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return list(value)
            raise ValueError(f"expected a list of strings, got {value!r}")
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value
    except ValueError as e:
        raise ValueError(f"{where}: field {name!r}: {e}") from None


def load_config(path) -> Config:
    """A Config from a TOML file; unknown keys and wrong types are errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such config file: {path}")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    return apply_overrides(Config(), table, where=str(path))


def apply_overrides(config: Config, values: dict, where: str = "overrides") -> Config:
    changes = {}
    for name, value in values.items():
        if name not in _FIELDS:
            raise _unknown(name, where)
        changes[name] = _convert(name, value, where)
    return dataclasses.replace(config, **changes)


def parse_args(argv: list[str]) -> tuple[str | None, dict]:
    """(config path or None, {field: raw value}) from command-line words."""
    path, values, i = None, {}, 0
    while i < len(argv):
        word = argv[i]
        if not word.startswith("--"):
            if path is not None:
                raise ValueError(f"command line: a second config file {word!r} (already {path!r})")
            path, i = word, i + 1
            continue
        name = word[2:].replace("-", "_")
        if "=" in name:
            name, value = name.split("=", 1)
            values[name], i = value, i + 1
        elif name.startswith("no_") and name[3:] in _FIELDS and _HINTS[name[3:]] is bool:
            values[name[3:]], i = False, i + 1
        elif name in _FIELDS and _HINTS[name] is bool and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            values[name], i = True, i + 1
        else:
            if name not in _FIELDS:
                raise _unknown(name, "command line")
            if i + 1 == len(argv):
                raise ValueError(f"command line: --{name} needs a value")
            values[name], i = argv[i + 1], i + 2
    for name in values:
        if name not in _FIELDS:
            raise _unknown(name, "command line")
    return path, values
