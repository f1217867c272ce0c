"""Reading the JSON files of a checkpoint folder (config.json, tokenizer_config.json, ...)."""
import json
from pathlib import Path

__all__ = ["read_json_object"]


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`; one clear error naming the file if it is not valid JSON or not
    an object (a missing file raises FileNotFoundError as open() does)."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data
