"""Run the fault suite and print its summary table (``make faults``: the full profile).

    tests/faults/run.py [--profile short|full] [pytest arguments...]

Runs ``pytest tests/faults`` with VACFACTORY_FAULTS_PROFILE set, collects one row per fault
class (trials, failures, worst recovery; see tests/faults/profile.py) and prints them as a
Markdown table for the README, followed by the problems of any failed class. A test that
failed before it recorded its row gets a failure row of its own (tests/faults/conftest.py);
a failed run in which no row shows a failure (pytest itself died, a collection error) gets
one too, so a failed run never prints a clean table. The exit status is pytest's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)

from tests.faults.profile import Row, table  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=("short", "full"), default="full")
    args, pytest_args = parser.parse_known_args()
    with tempfile.NamedTemporaryFile(prefix="vffaults-", suffix=".jsonl", delete=False) as f:
        results = f.name
    env = dict(os.environ, VACFACTORY_FAULTS_PROFILE=args.profile, VACFACTORY_FAULTS_RESULTS=results)
    began = time.monotonic()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
               os.path.join("tests", "faults"), *pytest_args]
    status = subprocess.call(command, cwd=REPO, env=env)
    elapsed = time.monotonic() - began
    rows = {}
    with open(results) as f:
        for line in f:
            row = Row(**json.loads(line))
            rows[row.fault] = row  # the last row of a class wins
    os.unlink(results)
    if status != 0 and not any(row.failures or row.problems for row in rows.values()):
        rows["pytest"] = Row(fault="pytest run (no fault class reported the failure)", trials=0, failures=1,
                             notes=f"pytest exit status {status}: see its output above",
                             problems=[f"pytest exited with status {status}"])
    print()
    print(f"## Fault suite, {args.profile} profile ({elapsed / 60:.1f} min, pytest exit status {status})")
    print()
    print(table(list(rows.values())))
    failed = [row for row in rows.values() if row.failures or row.problems]
    for row in failed:
        print(f"\n### {row.fault}: problems")
        for problem in row.problems:
            print(f"- {problem}")
    if not rows:
        print("(no fault class reported a result)")
        return status or 1
    return status


if __name__ == "__main__":
    sys.exit(main())
