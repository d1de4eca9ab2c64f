"""benchmarks/gpu_check.sh: its plan fits the lent GPU's time, and --dry-run runs its steps on the CPU."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
# The five ops and the test files that hold their CUDA / Triton cases (the 2-D scan's in VM-UNet's).
OP_TEST_FILES = {
    "cross_scan": "tests/test_cross_scan.py",
    "selective_scan": "tests/test_selective_scan.py",
    "selective_scan_2d": "tests/test_vmunet.py",
    "patchwise_softmax_loss": "tests/test_patchwise_softmax_loss.py",
    "patch_cross_attention": "tests/test_patch_cross_attention.py",
    "kmeans": "tests/test_kmeans.py",
}


def _plan() -> tuple[dict[str, int], int, str, list[str]]:
    out = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True, check=True).stdout
    steps, files, total_limit, select = {}, [], None, None
    for line in out.splitlines():
        key, _, rest = line.partition(" ")
        if key == "step":
            name, limit = rest.split()
            steps[name] = int(limit)
        elif key == "total":
            total_limit = int(rest.split()[-1])
        elif key == "test_select":
            select = rest
        elif key == "test_file":
            files.append(rest)
    return steps, total_limit, select, files


def test_gpu_check_plan_fits_420_seconds():
    steps, total_limit, _, _ = _plan()
    assert list(steps) == ["env", "build", "tests", "compile", "bench"]
    assert total_limit <= 420
    assert sum(steps.values()) <= total_limit, steps


def test_gpu_check_lists_the_tests_of_all_five_ops():
    _, _, select, files = _plan()
    for op, path in OP_TEST_FILES.items():
        assert path in files, (op, files)
    for path in files:
        assert (ROOT / path).exists(), path
    # The selection keeps tests of every file and no hypothesis property runs. On a GPU the
    # backend ids read cuda-cuda / triton-cuda; here the cpu kernel's ids stand in for the cuda
    # ones (and triton-cpu for triton-cuda).
    assert "cuda" in select and "triton" in select
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                "-k", select.replace("cuda", "cpu"), *files], cwd=ROOT, capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    ids = [line for line in collected.stdout.splitlines() if "::" in line]
    for path in files:
        assert any(i.startswith(path) for i in ids), f"{path}: nothing selected by {select!r}\n{collected.stdout[-2000:]}"
    assert not any("property" in i for i in ids)


def test_gpu_check_never_needs_expecttest():
    # The GPU image lacks expecttest; the script must neither import nor install it.
    assert "expecttest" not in SCRIPT.read_text()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "PYTHON": sys.executable,
                              "HOME": str(tmp_path)})
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else run.stdout
    assert run.returncode == 0, log[-4000:] + run.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    for step in ("env", "build", "tests", "compile", "bench"):
        assert f"| {step} | ok |" in summary, summary
    result = json.loads((out / "results" / "dry-run-cpu-gpu_check.json").read_text())
    rows = {(r["op"], r["provider"]): r for r in result["results"]}
    for op in ("patchwise_softmax_loss", "selective_scan", "selective_scan_2d", "cross_scan", "cross_merge",
               "patch_cross_attention", "kmeans"):
        for provider in ("reference", "cpu"):
            assert rows[op, provider]["forward_ms"] > 0 and rows[op, provider]["forward_gb_per_s"] > 0, rows[op, provider]
        assert rows[op, "cpu"]["speedup_vs_reference"] > 0
    assert rows["patch_cross_attention", "cpu"]["full_ms"] > 0 and rows["kmeans", "cpu"]["full_ms"] is None
    assert "| patch_cross_attention |" in summary  # the benchmark table made it into the summary
    compile_log = (out / "compile.log").read_text()
    for op in ("cross_merge", "patch_cross_attention", "kmeans"):
        assert f"ok      {op}" in compile_log, compile_log
