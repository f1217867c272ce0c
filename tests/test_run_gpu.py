"""tests/run_gpu.py: the GPU tests dealt to several pytest processes."""
import subprocess
import sys
from pathlib import Path

from tests.run_gpu import failed_ids, shares

ROOT = Path(__file__).resolve().parents[1]


def test_shares_deal_every_id_once_round_robin():
    ids = [f"t{i}" for i in range(7)]
    assert shares(ids, 3) == [["t0", "t3", "t6"], ["t1", "t4"], ["t2", "t5"]]
    assert shares(ids[:2], 5) == [["t0"], ["t1"]]
    assert shares([], 4) == []
    assert shares(ids, 0) == [ids]


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.run_gpu", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_a_failing_gpu_test_fails_the_run_and_is_named(tmp_path):
    (tmp_path / "test_some.py").write_text(
        "import pytest\npytestmark = pytest.mark.gpu\n\n"
        "def test_passes():\n    pass\n\n"
        "def test_fails():\n    assert 1 == 2\n\n"
        "@pytest.mark.parametrize('n', [1, 2, 3])\ndef test_many(n):\n    pass\n")
    (tmp_path / "test_not_gpu.py").write_text("def test_cpu():\n    assert False\n")  # not collected: -m gpu
    done = _run(tmp_path, "--jobs", "2")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "5 tests in 2 processes" in done.stdout
    assert "FAILED test_some.py::test_fails - assert 1 == 2" in done.stdout
    assert "1 failed beside the others; again, alone:\n1 failed" in done.stdout
    assert "test_cpu" not in done.stdout
    passing = _run(tmp_path, "--jobs", "3", "-k", "not fails")
    assert passing.returncode == 0, passing.stdout + passing.stderr
    assert "4 tests in 3 processes" in passing.stdout


def _first_run(mark: str) -> str:
    """Test-body lines setting `first`: True the first time the test runs (a file named `mark` beside it)."""
    return (f"    mark = pathlib.Path(__file__).with_name({mark})\n"
            "    first = not mark.exists()\n"
            "    mark.touch()\n")


def test_a_test_that_fails_only_beside_the_others_passes_alone(tmp_path):
    """The first run of test_flaky fails (as under another process's memory pressure), the rerun alone
    passes: the run passes, and says so."""
    (tmp_path / "test_some.py").write_text(
        "import pathlib\nimport pytest\npytestmark = pytest.mark.gpu\n\n"
        "def test_flaky():\n" + _first_run("'ran_once'") +
        "    assert not first, 'out of memory'\n\n"
        "def test_passes():\n    pass\n")
    done = _run(tmp_path, "--jobs", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAILED test_some.py::test_flaky - AssertionError: out of memory" in done.stdout
    assert "1 failed beside the others; again, alone:\n1 passed" in done.stdout


def test_failed_ids_with_spaces_are_found_and_rerun(tmp_path):
    """A parametrize id made by str() holds spaces and brackets; the failed test is still named and run
    again alone (before, the id was cut at its first space and pytest could not find it)."""
    (tmp_path / "test_some.py").write_text(
        "import pathlib\nimport pytest\npytestmark = pytest.mark.gpu\n\n"
        "@pytest.mark.parametrize('config', [(128, 2), (256, 1)], ids=str)\n"
        "def test_config(config):\n" + _first_run("f'ran_{config[0]}'") +
        "    assert not (first and config[0] == 128), 'out of memory'\n")
    done = _run(tmp_path, "--jobs", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAILED test_some.py::test_config[(128, 2)] - AssertionError: out of memory" in done.stdout
    assert "1 failed beside the others; again, alone:\n1 passed" in done.stdout


def test_failed_ids_match_the_longest_id_and_mark_unknown_lines():
    ids = ["t.py::f[a]", "t.py::f[a b]", "t.py::g"]
    lines = ["FAILED t.py::f[a b] - boom", "ERROR t.py::g", "FAILED t.py::f[a] - x - y", "ERROR t.py - ImportError",
             "passed"]
    assert failed_ids(lines, ids) == ["t.py::f[a b]", "t.py::g", "t.py::f[a]", None]
