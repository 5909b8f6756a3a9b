"""Run the test suite as given and record the run: benchmarks/results/gpu_tests_<device>.json.

    python3 benchmarks/gpu_tests.py -p no:cacheprovider            # plain pytest: one process
    python3 benchmarks/gpu_tests.py -p no:cacheprovider -n auto    # pytest-xdist

The arguments go to pytest as they are. The record holds the counts (passed, failed, skipped;
errors count as failed), the wall time, the command, the device and versions
(pdllm.environment) and the 10 slowest tests (setup, call and teardown together, from pytest's
JUnit XML). Exits with pytest's status; a run that did not get as far as tests writes nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from pdllm.autotune.configs import device_key
from pdllm.environment import environment

RESULTS = Path(__file__).resolve().parent / "results"


def record(junit: Path, command: list[str], seconds: float) -> dict:
    counts, times = {"passed": 0, "failed": 0, "skipped": 0}, []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = {child.tag for child in case}
        counts["failed" if outcome & {"failure", "error"} else "skipped" if "skipped" in outcome else "passed"] += 1
        times.append((float(case.get("time", 0)), f"{case.get('file')}::{case.get('name')}"))
    env = environment()
    return {**counts, "duration_s": round(seconds, 1), "command": " ".join(command), "device": env.get("device", "cpu"),
            "environment": env, "slowest": [{"test": name, "seconds": round(t, 2)} for t, name in sorted(times)[::-1][:10]]}


def main(argv: list[str]) -> int:
    command = ["pytest", *argv]
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        start = time.perf_counter()
        code = subprocess.run([sys.executable, "-m", *command, f"--junitxml={junit}", "-o", "junit_family=xunit1"],
                              cwd=RESULTS.parents[1]).returncode
        seconds = time.perf_counter() - start
        if not junit.exists():
            return code
        result = record(junit, command, seconds)
    out = RESULTS / f"gpu_tests_{device_key(result['device'])}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['passed']} passed, {result['failed']} failed, {result['skipped']} skipped in "
          f"{result['duration_s']} s -> {out}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
