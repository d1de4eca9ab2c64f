"""benchmarks/summarize.py reads every committed result file (the README's tables come from it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALL_RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
RESULTS = [p for p in ALL_RESULTS if '"benchmarks"' in p.read_text()]
OTHERS = [p for p in ALL_RESULTS if p not in RESULTS]


def _summarize():
    spec = importlib.util.spec_from_file_location("bench_summarize", ROOT / "benchmarks" / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", RESULTS, ids=[p.stem for p in RESULTS])
def test_every_result_file_gives_a_table(path):
    summarize = _summarize()
    machine, groups = summarize.load_rows(path)
    table = summarize.to_markdown(machine, groups)
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| op ")]
    assert groups, f"{path.name}: no benchmark with an op and a provider"
    assert len(rows) == len(groups)
    for (op, mode, _, _), _times in groups.items():
        assert any(row.startswith(f"| {op} | {mode} |") for row in rows)


def test_kmeans_rows_name_k_and_iterations():
    path = ROOT / "benchmarks" / "results" / "cpu-2core-xeon-kmeans.json"
    if not path.is_file():
        pytest.skip("no k-means result file")
    summarize = _summarize()
    _, groups = summarize.load_rows(path)
    assert groups and all(op == "kmeans" and mode == "forward" and shape[-2:] == ("k2", "20it")
                          for op, mode, shape, _ in groups)


@pytest.mark.parametrize("path", OTHERS, ids=[p.stem for p in OTHERS])
def test_script_result_files_are_refused_by_name(path):
    with pytest.raises(ValueError, match="not a pytest-benchmark"):
        _summarize().load_rows(path)
