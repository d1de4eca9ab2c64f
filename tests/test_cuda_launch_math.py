"""The host-side launch plan of the CUDA patch cross-attention kernels, checked without a GPU.

csrc/cuda/patch_cross_attention_launch.h is plain C++: a small driver compiled here with the
system C++ compiler feeds it shapes and prints the plan (blocks, threads, rounds, chunk,
shared bytes) or its refusal.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")

DRIVER = r"""
#include <iostream>
#include "patch_cross_attention_launch.h"
int main() {
  using namespace lesionkit::patch_attention;
  long long planes, windows, patch, dk, dv, values, acc;
  while (std::cin >> planes >> windows >> patch >> dk >> dv >> values >> acc) {
    Launch l;
    const std::string why = plan_launch(planes, windows, patch, dk, dv, values, acc, &l);
    if (!why.empty()) { std::cout << "ERR " << why << "\n"; continue; }
    std::cout << l.blocks << " " << l.threads << " " << l.rounds << " " << l.chunk << " " << l.shared
              << " " << register_bound(std::max(dk, dv)) << "\n";
  }
}
"""


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler")
    folder = tmp_path_factory.mktemp("launch")
    (folder / "driver.cpp").write_text(DRIVER)
    exe = folder / "driver"
    subprocess.run([CXX, "-std=c++17", "-O1", "-I", str(REPO / "csrc" / "cuda"), str(folder / "driver.cpp"),
                    "-o", str(exe)], check=True, capture_output=True, text=True)

    def run(cases):
        stdin = "".join(" ".join(map(str, c)) + "\n" for c in cases)
        out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True).stdout
        return out.splitlines()

    return run


def test_threads_rounds_and_chunks(plan):
    rows = plan([(2, 12, 16, 16, 4, 20, 4),        # T = 256: one round of 256 threads
                 (1, 1, 32, 8, 8, 16, 4),          # T = 1024: four rounds
                 (3, 5, 3, 5, 7, 12, 4),           # T = 9: one warp
                 (1, 1, 1, 1, 1, 2, 8),            # P = 1
                 (1, 4, 8, 256, 256, 514, 8)])     # widest: 514 doubles per token
    assert rows[0] == "24 256 1 32 2560 16"
    assert rows[1] == "1 256 4 32 2048 16"
    assert rows[2] == "15 32 1 32 1536 16"
    assert rows[3] == "1 32 1 32 512 16"
    assert rows[4] == f"4 64 1 11 {11 * 514 * 8} 256"  # 49152 // 4112 = 11 tokens per chunk


def test_plan_holds_for_every_patch_size_and_width(plan):
    cases = [(1, 1, p, dk, dv, dk + dv + 2, acc)
             for p in range(1, 33) for dk, dv in ((1, 1), (16, 17), (64, 64), (65, 3), (256, 256)) for acc in (4, 8)]
    for case, row in zip(cases, plan(cases)):
        _, _, p, dk, dv, values, acc = case
        blocks, threads, rounds, chunk, shared, bound = map(int, row.split())
        assert threads % 32 == 0 and 32 <= threads <= 256, (case, row)  # within __launch_bounds__(256)
        assert threads * rounds >= p * p > threads * (rounds - 1), (case, row)
        assert 1 <= chunk <= 32 and shared == chunk * values * acc <= 48 * 1024, (case, row)
        assert bound >= max(dk, dv) and bound in (16, 64, 256), (case, row)


def test_refusals_name_the_limit(plan):
    rows = plan([(1, 1, 33, 4, 4, 10, 4), (1, 1, 8, 257, 4, 263, 4), (2**16, 2**16, 1, 4, 4, 10, 4)])
    assert rows[0].startswith("ERR") and "patch_size <= 32, got patch_size=33" in rows[0]
    assert "dk, dv <= 256 channels per head, got dk=257, dv=4" in rows[1]
    assert "grid.x (2^31 - 1), got 4294967296" in rows[2]
