"""Where benchmark tables go: stdout, and $OUT/<name>.md when OUT is set (the device tool's folder)."""
import os


def publish(name: str, text: str) -> None:
    """Print `text` and, when OUT is set, write it to $OUT/<name>.md (temporary file, then rename)."""
    print("\n" + text)
    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], f"{name}.md")
        with open(path + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(path + ".tmp", path)
