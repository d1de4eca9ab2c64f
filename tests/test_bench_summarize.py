"""benchmarks/summarize.py reads every committed result file (the README's tables come from it)."""

from __future__ import annotations

import importlib.util
import json
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
    path = ROOT / "benchmarks" / "results" / "cpu-2core-xeon-kmeans-1thread.json"
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


def _bench_conftest():
    spec = importlib.util.spec_from_file_location("bench_conftest", ROOT / "benchmarks" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_run_above_the_core_count_is_not_quotable(monkeypatch):
    conftest = _bench_conftest()
    monkeypatch.setattr(conftest.os, "cpu_count", lambda: 2)
    assert conftest.load_record([0.4, 0.3, 0.2], [1.9, 0.8, 0.4])["quotable"]
    assert not conftest.load_record([0.4, 0.3, 0.2], [2.5, 0.8, 0.4])["quotable"]
    assert not conftest.load_record([9.0, 8.0, 7.0], [0.5, 3.0, 5.0])["quotable"]
    assert not conftest.load_record(None, None)["quotable"]


def test_the_table_of_an_unquotable_run_says_so(tmp_path):
    summarize = _summarize()
    bench = {"extra_info": {"op": "kmeans", "provider": "cpu", "shape": [2, 3, 4]},
             "stats": {"median": 0.001}}
    for quotable, load in ((True, 0.5), (False, 9.5)):
        path = tmp_path / f"run-{quotable}.json"
        path.write_text(json.dumps({"benchmarks": [bench], "machine_info": {
            "lesionkit_machine": "m", "cores": 2, "quotable": quotable,
            "load_average_1_5_15_min_at_start": [load, 0, 0],
            "load_average_1_5_15_min_at_end": [load, 0, 0]}}))
        machine, _ = summarize.load_rows(path)
        assert ("NOT QUOTABLE" in machine) is (not quotable), machine
