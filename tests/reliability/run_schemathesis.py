"""schemathesis against a live stack: `python -m tests.reliability.run_schemathesis --max-time S`.

Starts a real `serve` stack (gateway + bundled Triton, API key configured) on free loopback
ports, runs the schemathesis CLI against its /openapi.json with every check but the two
`EXCLUDED_CHECKS` (below: why each), and stops the stack. Exit status: schemathesis's (0: no
server error, no schema violation). `make schemathesis` runs it for 3 minutes; CI for ~50 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# positive_data_acceptance: random strings are not decodable images. use_after_free: prompt-set
# ids are content hashes, so with 2 workers one worker's import of the same set (schemathesis
# draws the same small values in both) revives the id another just deleted (seen once in CI,
# 2026-12-07); a deleted set's 404 is tested directly in tests/test_gateway.py.
EXCLUDED_CHECKS = ("positive_data_acceptance", "use_after_free")


def schemathesis_command(url: str, api_key: str, max_time: int, report_dir: Path) -> list[str]:
    binary = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis"
    return [
        binary,
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--exclude-checks",
        ",".join(EXCLUDED_CHECKS),
        "-H",
        f"Authorization: Bearer {api_key}",
        "--max-time",
        str(max_time),
        "--workers",
        "2",
        "--request-timeout",
        "30",
        "--suppress-health-check",
        "all",
        "--report",
        "junit",
        "--report-dir",
        str(report_dir),
    ]


def run(stack, api_key: str, max_time: int, report_dir: Path) -> subprocess.CompletedProcess:
    cmd = schemathesis_command(stack.url, api_key, max_time, report_dir)
    env = {**os.environ, "NO_COLOR": "1"}
    report_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.run(  # in report_dir: schemathesis writes its .schemathesis/ cache there
        cmd, capture_output=True, text=True, timeout=max_time + 300, env=env, cwd=report_dir
    )


def main() -> int:
    from tests.serve_stack import API_KEY, EXPORT_SETTINGS, serve_stack

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-time", type=int, default=180, help="schemathesis time budget, s")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="schemathesis-") as tmp:
        root = Path(tmp)
        with serve_stack(root / "stack", root / "repositories", **EXPORT_SETTINGS) as stack:
            result = run(stack, API_KEY, args.max_time, root / "report")
    print(result.stdout[-20000:])
    print(result.stderr[-4000:], file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
