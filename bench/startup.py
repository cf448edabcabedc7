"""Start-up time of the `moe` command: `moe --version`, `moe --help` and a mistyped command import neither torch
nor timm. Prints the median wall time of each over N runs (fresh processes) and whether torch was imported.

    python bench/startup.py [--runs 10] [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time

CASES = [["--version"], ["--help"], ["upcyle"]]
PROBE = ("import sys\nfrom moe_cli.cli.app import main\nsys.argv = ['moe', *{args!r}]\ntry:\n    main()\n"
         "except SystemExit:\n    pass\nprint('TORCH', 'torch' in sys.modules)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = ["| command | median s | torch imported |", "|---|---|---|"]
    for case in CASES:
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "moe_cli", *case], capture_output=True)
            times.append(time.perf_counter() - t0)
        probe = subprocess.run([sys.executable, "-c", PROBE.format(args=case)], capture_output=True, text=True)
        torch = probe.stdout.strip().splitlines()[-1].endswith("True")
        rows.append(f"| `moe {' '.join(case)}` | {statistics.median(times):.3f} | {'yes' if torch else 'no'} |")
    print("\n".join(rows))
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n### Start-up ({platform.processor() or platform.machine()}, Python "
                    f"{platform.python_version()})\n\nCommand: `python bench/startup.py --runs {args.runs}`\n\n"
                    + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
