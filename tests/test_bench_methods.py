"""benchmarks/methods.py runs end to end on CPU (--dry-run: tiny shape, reference backend) and writes JSON + markdown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_methods_benchmark_dry_run(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "methods.py"), "--dry-run", "--out", str(tmp_path),
           "--repeats", "1", "--warmup", "0"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
    data = json.loads(next(tmp_path.glob("methods-dry-run-*.json")).read_text())
    methods = {r["method"] for r in data["rows"]}
    assert {"dense SDPA", "window", "radial", "svdit:diagonal", "svdit:mixed"} <= methods
    mixed = next(r for r in data["rows"] if r["method"] == "svdit:mixed")
    assert mixed["launches"] == 2 and 0 < mixed["density"] < 1
    assert "| radial |" in next(tmp_path.glob("methods-dry-run-*.md")).read_text()
