"""Markdown tables from a pytest-benchmark JSON file: median times and speed-ups over the
eager reference, per op, mode and shape (the README's benchmark tables).

    python benchmarks/summarize.py benchmarks/results/<machine>.json [--op NAME]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def load_rows(path: Path, op: str | None = None) -> tuple[str, dict]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "benchmarks" not in data:
        raise ValueError(f"{path} is not a pytest-benchmark JSON file (no 'benchmarks' list); the "
                         "training-throughput and scan-stage files are written by their own scripts")
    info = data.get("machine_info", {})
    machine = info.get("lesionkit_machine", path.stem)
    if not info.get("quotable", False):
        # Taken with the cores oversubscribed (or before loads were recorded): say so in the table.
        start = (info.get("load_average_1_5_15_min_at_start") or ["?"])[0]
        end = (info.get("load_average_1_5_15_min_at_end") or ["?"])[0]
        machine += (f" - NOT QUOTABLE: 1-minute load {start} at start, {end} at end, on "
                    f"{info.get('cores', '?')} cores (or not recorded)")
    groups: dict = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "provider" not in info or (op and info.get("op") != op):
            continue
        shape = tuple(info["shape"])
        if "patch_size" in info:  # ops benchmarked at several patch sizes per shape
            shape += (f"P{info['patch_size']}",)
        if "k" in info:  # k-means: clusters and fixed iterations are part of the problem
            shape += (f"k{info['k']}", f"{info.get('iters', '?')}it")
        # Ops without a gradient (k-means) record no mode: their only mode is the forward.
        key = (info["op"], info.get("mode", "forward"), shape, info.get("min_bytes"))
        groups[key][info["provider"]] = bench["stats"]["median"]
    return machine, groups


def to_markdown(machine: str, groups: dict) -> str:
    providers = sorted({p for times in groups.values() for p in times},
                       key=lambda p: ["reference", "compile", "cpu", "cuda", "triton"].index(p)
                       if p in ("reference", "compile", "cpu", "cuda", "triton") else 99)
    head = ["op", "mode", "shape"] + [f"{p} (ms)" for p in providers]
    head += [f"{p} vs reference" for p in providers if p != "reference"]
    head += ["best kernel GB/s"]
    lines = [f"Machine: {machine}. Median of the timed rounds; speed-up = reference time / time.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (op, mode, shape, min_bytes), times in sorted(groups.items()):
        ref = times.get("reference")
        cells = [op, mode, "x".join(map(str, shape))]
        cells += [f"{times[p] * 1e3:.3f}" if p in times else "-" for p in providers]
        cells += [f"{ref / times[p]:.2f}x" if ref and p in times else "-"
                  for p in providers if p != "reference"]
        kernel_times = [times[p] for p in ("cpu", "cuda", "triton") if p in times]
        cells.append(f"{min_bytes / min(kernel_times) / 1e9:.1f}" if kernel_times and min_bytes else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json", type=Path)
    parser.add_argument("--op", default=None)
    args = parser.parse_args()
    print(to_markdown(*load_rows(args.json, args.op)))


if __name__ == "__main__":
    main()
