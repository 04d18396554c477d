"""Launch overhead of execbox against its peers, measured interleaved in one run.

A: execbox.run(["/bin/true"])           vs  subprocess.run(["/bin/true"])   (per launch)
B: `execbox run -- /bin/true`           vs  the smallest Python wrapper      (start to exit)

Prints medians and ratios and rewrites docs/benchmarks.md (date and machine included).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import execbox

ROOT = Path(__file__).resolve().parent.parent
WRAPPER = "import subprocess,sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"


def interleave(pairs: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in pairs}
    for _ in range(rounds):
        for name, action in pairs.items():
            started = time.perf_counter()
            action()
            samples[name].append(time.perf_counter() - started)
    return samples


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} cores, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--api-rounds", type=int, default=1000)
    parser.add_argument("--cli-rounds", type=int, default=200)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/")
    args = parser.parse_args()

    cli = shutil.which("execbox", path=os.path.dirname(sys.executable)) or "execbox"
    execbox.run(["/bin/true"])  # start the fork server outside the measurement
    for _ in range(50):  # warm caches for both sides
        execbox.run(["/bin/true"])
        subprocess.run(["/bin/true"], check=False)

    api = interleave({
        "execbox.run": lambda: execbox.run(["/bin/true"]),
        "subprocess.run": lambda: subprocess.run(["/bin/true"], check=False),
    }, args.api_rounds)
    devnull = subprocess.DEVNULL
    command = interleave({
        "execbox run": lambda: subprocess.run([cli, "run", "--", "/bin/true"], stdin=devnull,
                                              check=True),
        "python wrapper": lambda: subprocess.run([sys.executable, "-c", WRAPPER, "/bin/true"],
                                                 stdin=devnull, check=True),
    }, args.cli_rounds)

    med = {name: statistics.median(v) * 1000 for name, v in {**api, **command}.items()}
    api_ratio = med["execbox.run"] / med["subprocess.run"]
    cli_ratio = med["execbox run"] / med["python wrapper"]
    lines = [
        f"| `execbox.run(['/bin/true'])` | {med['execbox.run']:.3f} ms "
        f"| `subprocess.run(['/bin/true'])` | {med['subprocess.run']:.3f} ms "
        f"| {api_ratio:.2f}x | <= 1.0x |",
        f"| `execbox run -- /bin/true` | {med['execbox run']:.2f} ms "
        f"| minimal Python wrapper | {med['python wrapper']:.2f} ms "
        f"| {cli_ratio:.2f}x | <= 1.3x |",
    ]
    report = "\n".join([
        "| execbox | median | peer | median | ratio | target |",
        "|---|---|---|---|---|---|",
        *lines,
    ])
    print(report)
    if not args.no_write:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        section = (f"## Latest run: {stamp}\n\nMachine: {machine()}. "
                   f"{args.api_rounds} API rounds and {args.cli_rounds} CLI rounds, "
                   f"interleaved.\n\n{report}\n")
        path = ROOT / "docs" / "benchmarks.md"
        text = path.read_text() if path.exists() else ""
        head, marker, _ = text.partition("## Latest run:")
        path.write_text((head if marker else text + "\n") + section)
        print(f"updated {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
