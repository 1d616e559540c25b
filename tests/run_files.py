"""`make test`'s runner: every tests/test_*.py in its own pytest process, `--jobs` of them at once.

One process per file: in one process of the whole suite (~1300 tests, thousands of compiles)
XLA:CPU has segfaulted while compiling, late in the run, in tests that pass alone. Two at once: much
of the suite's time is XLA compiling, which runs on one core, so a second file fills the other (CI
on 2 cores: 33 min one at a time). Longest files start first (the last run's times, kept under the
cache dir; on a fresh clone file size stands in). Each file's output is printed whole when it ends,
with its time; the failed files are listed at the end and fail the run. pytest's exit status 5
(nothing collected: a whole file skipped, e.g. llama-cpp-python not installed) is not a failure.

    python tests/run_files.py [--jobs N] [FILE ...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from pallas_kernels.cache_dir import cache_root  # the one cache-directory rule (the editable install)

ROOT = Path(__file__).resolve().parents[1]

NOTHING_COLLECTED = 5


def durations_path() -> Path:
    return cache_root() / "test_durations.json"


def known_durations() -> dict[str, float]:
    try:
        return json.loads(durations_path().read_text())
    except (OSError, ValueError):
        return {}


def longest_first(files: list[Path]) -> list[Path]:
    known = known_durations()
    return sorted(files, key=lambda f: (-known.get(f.name, f.stat().st_size / 100), f.name))


def run_file(path: Path) -> tuple[Path, int, float, str]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", str(path.relative_to(ROOT))], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return path, proc.returncode, time.monotonic() - start, proc.stdout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="test files run at once")
    parser.add_argument("files", nargs="*", type=Path, help="default: every tests/test_*.py")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    files = [f.resolve() for f in args.files] or sorted((ROOT / "tests").glob("test_*.py"))
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        parser.error(f"no such test file: {', '.join(missing)}")
    start, failed, times = time.monotonic(), [], {}
    with ThreadPoolExecutor(args.jobs) as pool:
        for future in as_completed([pool.submit(run_file, f) for f in longest_first(files)]):
            path, rc, seconds, output = future.result()
            times[path.name] = round(seconds, 1)
            if rc not in (0, NOTHING_COLLECTED):
                failed.append(str(path.relative_to(ROOT)))
            print(output, end="" if output.endswith("\n") else "\n")
            print(f"== {path.relative_to(ROOT)}: {seconds:.0f} s (exit {rc})", flush=True)
    try:
        durations_path().parent.mkdir(parents=True, exist_ok=True)
        durations_path().write_text(json.dumps(known_durations() | times, indent=1, sort_keys=True))
    except OSError as e:  # only the order of the next run depends on it
        print(f"note: could not record the test times: {e}")
    print(f"{len(files)} test files in {time.monotonic() - start:.0f} s, {args.jobs} at once")
    if failed:
        print("FAILED: " + " ".join(failed))
        return 1
    print("all test files passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
