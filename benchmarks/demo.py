"""The README demo, timed: `opro-agent optimize tasks/yes_no_facts.yaml --steps 3
--candidates 4` on the embedded model, with a fresh run directory and no response cache.
Prints wall time, calls, tokens and train / test scores against the 3-minute target.

    python benchmarks/demo.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 180.0


def main() -> None:
    with tempfile.TemporaryDirectory() as run_dir:
        command = [
            sys.executable, "-m", "opro_agent.cli", "optimize", "tasks/yes_no_facts.yaml",
            "--steps", "3", "--candidates", "4", "--json", "--no-cache", "--run-dir", run_dir,
        ]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"the demo failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    scores, calls, tokens = summary["scores"], summary["calls"], summary["tokens"]
    print(f"README demo on the embedded model ({os.cpu_count()} cores)")
    print(
        f"  wall time        {wall:8.1f} s   (target < {TARGET_SECONDS:.0f} s: "
        f"{'met' if wall < TARGET_SECONDS else 'missed'})"
    )
    print(
        f"  calls            optimizer {calls['optimizer']}, scorer {calls['scorer']} "
        f"({summary['saved_by_early_rejection']} saved by early rejection)"
    )
    print(f"  tokens           {tokens['prompt']} prompt, {tokens['completion']} completion")
    print(
        f"  scores           train {scores['train']:.3f}, validation "
        f"{scores['validation']:.3f}, test {scores['test']:.3f}"
    )
    for text, score in summary["baselines"].items():
        print(f"  baseline test    {score:.3f}  {text!r}")
    print(f"  best instruction {summary['best_instruction']!r}")


if __name__ == "__main__":
    main()
