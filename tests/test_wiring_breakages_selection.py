"""The breakage runner's combined baseline selects exactly the tests of the single selections."""

import subprocess
import sys

from wiring_breakages import baseline_runs


def test_selections_combine_into_one_run_and_node_ids_stay_apart():
    runs = baseline_runs([("tests/test_a.py",), ("tests/test_b.py", "-k", "x or y"), ("tests/test_a.py",),
                          ("tests/test_c.py::test_z",), ("tests/test_d.py", "--lf")])
    assert runs == [
        ("tests/test_a.py", "tests/test_b.py", "-k", "(test_a.py) or ((test_b.py) and (x or y))"),
        ("tests/test_c.py::test_z",),
        ("tests/test_d.py", "--lf"),
    ]


def _collected(root, args):
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                         cwd=root, capture_output=True, text=True).stdout
    return {line for line in out.splitlines() if "::" in line}


def test_combined_expression_selects_the_union_of_the_selections(tmp_path):
    # test_cross.py's names contain the other files' -k words, and test_amlp_trainer.py starts
    # with test_amlp: a match on a test's name rather than its file, or an "or" inside one
    # selection's -k leaking into the others, would show here.
    (tmp_path / "test_amlp.py").write_text("def test_one(): pass\ndef test_features(): pass\n")
    (tmp_path / "test_amlp_trainer.py").write_text("def test_features(): pass\ndef test_amr(): pass\n")
    (tmp_path / "test_cross.py").write_text("def test_features_amr(): pass\ndef test_amr_command(): pass\n"
                                            "def test_other(): pass\n")
    selections = [("test_amlp_trainer.py", "-k", "features or amr"), ("test_cross.py", "-k", "not command"),
                  ("test_amlp.py",)]
    union = set().union(*(_collected(tmp_path, s) for s in selections))
    (combined,) = baseline_runs(selections)
    assert union == {"test_amlp_trainer.py::test_features", "test_amlp_trainer.py::test_amr",
                     "test_cross.py::test_features_amr",
                     "test_cross.py::test_other", "test_amlp.py::test_one", "test_amlp.py::test_features"}
    assert _collected(tmp_path, combined) == union
