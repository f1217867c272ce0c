"""The README's Python examples run as written (the quickstart is the first thing users type)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_first_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it writes out/quickstart-adapter
    exec(compile(_blocks()[0], "README.md (quickstart)", "exec"), {})
    assert (tmp_path / "out" / "quickstart-adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_the_llama_example_runs(capsys, monkeypatch):
    monkeypatch.chdir(README.parent)  # the model cache lives in the repository's .cache
    import models
    try:
        models.fetch_smollm2()
    except models.FetchError as e:
        pytest.skip(f"the real model cannot be fetched here: {e}")
    exec(compile(_blocks()[1], "README.md (QLoRA example)", "exec"), {})
    assert "Paris" in capsys.readouterr().out
