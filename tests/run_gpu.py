"""The GPU tests in several processes at once.

    python -m tests.run_gpu [--jobs N] [pytest arguments: files, -k ...]

The GPU tests are compile-bound: every kernel config they launch is a Triton compile on the host
(seconds each), the checks themselves take milliseconds of the GPU. Run one after the other,
single files of the kernels' GPU tests took more than 200 s; in 15 processes the whole GPU suite,
915 tests, took 195 s (H100, 16 cores, benchmarks/RESULTS.md run 176). So the node ids the GPU tests
collect (`-m gpu`) are dealt round-robin to N pytest processes, which share Triton's on-disk cache;
each process's output goes to its own file, and the summaries and failures are printed at the end.
Tests that failed beside the others then run again alone, in one process, and decide the exit
status (0: every test passed or had nothing to run, else 1): the processes share the GPU's memory.
In the whole suite (915 tests in 15 processes, H100, runs 176 and 180) the same 6 tests failed
beside the others, out of memory (Triton's launches, torch's allocator, cuBLAS's handle), and all 6
passed alone.

Tests that time kernels (KERNELS_TUNE=1) should run with --jobs 1: processes sharing one GPU slow
each other's timings down.
"""
import argparse
import os
import subprocess
import sys
import tempfile


def shares(node_ids: list[str], jobs: int) -> list[list[str]]:
    """node_ids dealt round-robin to at most `jobs` non-empty shares (neighbouring ids, which often
    compile the same kernels, go to different processes)."""
    jobs = max(1, jobs)
    return [share for share in (node_ids[i::jobs] for i in range(jobs)) if share]


def collect(pytest_args: list[str]) -> list[str]:
    """The node ids of the GPU tests that pytest_args select."""
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                           *pytest_args], capture_output=True, text=True)
    if done.returncode not in (0, 5):  # 5: nothing collected
        sys.exit(f"run_gpu: collecting the tests failed:\n{done.stdout}{done.stderr}")
    return [line for line in done.stdout.splitlines() if "::" in line]


def _pytest(node_ids: list[str], log) -> subprocess.Popen:
    """A pytest process on node_ids writing to `log` (wide lines: the short summary keeps its messages)."""
    return subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *node_ids],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "300"})


def failed_ids(lines: list[str], node_ids: list[str]) -> list[str | None]:
    """For each of pytest's short summary lines `FAILED id - message` and `ERROR id - message`, the node id
    of node_ids it names, or None (a collection error, say). An id may hold spaces (a parametrize id made
    by str()), so a line is matched against the ids, the longest first, not split at its first space."""
    by_length = sorted(node_ids, key=len, reverse=True)
    named = []
    for line in lines:
        if line.startswith(("FAILED ", "ERROR ")):
            rest = line.split(" ", 1)[1]
            named.append(next((i for i in by_length if rest == i or rest.startswith(i + " ")), None))
    return named


def _report(lines: list[str]) -> None:
    """The failures' summary lines, or the output's end when pytest itself failed."""
    print("\n".join(line for line in lines if line.startswith(("FAILED", "ERROR"))) or "\n".join(lines[-30:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="pytest processes at once")
    args, pytest_args = parser.parse_known_args(argv)
    node_ids = collect(pytest_args)
    groups = shares(node_ids, args.jobs)
    print(f"run_gpu: {len(node_ids)} tests in {len(groups)} processes", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        running = []
        for i, group in enumerate(groups):
            log = open(os.path.join(folder, f"share{i}.txt"), "w+")
            running.append((_pytest(group, log), log))
        again, broken = [], False
        for i, ((process, log), group) in enumerate(zip(running, groups)):
            status = process.wait()
            log.seek(0)
            lines = log.read().splitlines()
            log.close()
            print(f"share {i}: {lines[-1] if lines else '(no output)'}")
            if status not in (0, 5):  # 5: nothing ran
                _report(lines)
                named = failed_ids(lines, group)
                again += [i for i in named if i is not None]
                broken |= not named or None in named  # pytest failed without naming a test it ran
        if broken:
            return 1
        if not again:
            return 0
        print(f"run_gpu: {len(again)} failed beside the others; again, alone:", flush=True)
        with open(os.path.join(folder, "again.txt"), "w+") as log:
            status = _pytest(again, log).wait()
            log.seek(0)
            lines = log.read().splitlines()
        print(lines[-1] if lines else "(no output)")
        if status != 0:
            _report(lines)
        return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
