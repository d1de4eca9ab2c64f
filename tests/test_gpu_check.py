"""benchmarks/gpu_check.sh --dry-run: the one-shot GPU validation runs its steps on the CPU."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "PYTHON": sys.executable,
                              "HOME": str(tmp_path)})
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else run.stdout
    assert run.returncode == 0, log[-4000:] + run.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    for step in ("env", "deps", "build", "tests", "compile", "bench"):
        assert f"| {step} | ok |" in summary, summary
    result = json.loads((out / "results" / "dry-run-cpu-gpu_check.json").read_text())
    rows = {(r["op"], r["provider"]): r for r in result["results"]}
    for op in ("patchwise_softmax_loss", "selective_scan", "selective_scan_2d", "cross_scan", "cross_merge"):
        for provider in ("reference", "compiled-reference"):
            assert rows[op, provider]["full_ms"] > 0, rows[op, provider]
    assert "| cross_merge |" in summary  # the benchmark table made it into the summary
    assert "ok      cross_merge" in (out / "compile.log").read_text()
