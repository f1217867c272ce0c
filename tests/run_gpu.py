"""The GPU tests in several processes at once.

    python -m tests.run_gpu [--jobs N] [pytest arguments: files, -k ...]

The GPU tests are compile-bound: every kernel config they launch is a Triton compile on the host
(seconds each), the checks themselves take milliseconds of the GPU. Run one after the other, the
kernels' GPU tests took more than 200 s; in 14 processes the 405 tests of nf4_mma and the tiled
codes took 85 s (H100, 16 cores, benchmarks/RESULTS.md run 172). So the node ids the GPU tests
collect (`-m gpu`) are dealt round-robin to N pytest processes, which share Triton's on-disk cache;
each process's output goes to its own file, and the summaries and failures are printed at the end.
Exit status: 0 when every process passed (or had nothing to run), else 1.

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
            process = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                                        *group], stdout=log, stderr=subprocess.STDOUT)
            running.append((process, log))
        failed = 0
        for i, (process, log) in enumerate(running):
            status = process.wait()
            log.seek(0)
            lines = log.read().splitlines()
            log.close()
            summary = lines[-1] if lines else "(no output)"
            print(f"share {i}: {summary}")
            if status != 0:
                failed += 1
                print("\n".join(line for line in lines if line.startswith(("FAILED", "ERROR"))) or "\n".join(lines[-30:]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
