"""CPU inference of an exported SS2D model: ONNX Runtime vs PyTorch with the cpu scan kernel
(docs/ops.md, "Export to ONNX"; README, "Deploy").

The model (``vmunet_tiny`` by default, seeded random weights: the time does not depend on their
values) is exported as ``lesionkit export --format onnx`` does (batch dynamic, the graph tidied
at the default level, "light") once per scan chunk size, then timed as the median of ``--repeats`` forward
passes after one warm-up, at each batch size and thread count: PyTorch (eval, no_grad,
``torch.set_num_threads``) with the compiled cpu scan kernel, and ONNX Runtime's CPU provider
(``intra_op_num_threads``, one inter-op thread). The first chunk size is the one timed across
batches and threads; the others are timed at the first batch and thread count only, for the
choice of the default chunk. ``--baseline-build DIR``: files of the same names exported by an
earlier lesionkit (``PYTHONPATH=OLD_CHECKOUT python benchmarks/onnx_inference.py --build DIR
--export-only``), each timed right after this version's file of its chunk size, so the two
lowerings are compared side by side in one run.

Exporting is slow and not timed, so ``--build DIR`` writes the files first and a second call
with the same ``--build DIR`` times them (under the quiet protocol's lock):

    python benchmarks/onnx_inference.py --build /tmp/onnx-bench --export-only
    python benchmarks/onnx_inference.py --build /tmp/onnx-bench --out benchmarks/results/NAME.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import lesionkit.kernels as K
from lesionkit.engine.export import LogitsOnly, _export_onnx
from lesionkit.models import create_model


def build(name: str, size: int, chunks: list[int], folder: Path) -> tuple[torch.nn.Module, dict[int, Path]]:
    torch.manual_seed(0)
    model = LogitsOnly(create_model(name)).eval()
    files = {}
    for chunk in chunks:
        path = folder / f"{name}-{size}px-chunk{chunk}.onnx"
        if not path.is_file():
            t0 = time.perf_counter()
            with torch.no_grad():
                _export_onnx(model, torch.rand(1, 3, size, size), path, name, scan_chunk=chunk)
            print(f"exported {path.name} in {time.perf_counter() - t0:.0f} s", flush=True)
        files[chunk] = path
    return model, files


def median_seconds(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vmunet_tiny")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--chunks", type=int, nargs="+", default=[16, 8, 32, 64],
                        help="scan chunk sizes; the first is timed everywhere, the rest at the first batch / threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--build", required=True, help="folder for the exported files (kept between calls)")
    parser.add_argument("--baseline-build", help="folder of files exported by an earlier lesionkit, timed beside these")
    parser.add_argument("--baseline-label", default="", help="what exported the baseline files (recorded in the JSON)")
    parser.add_argument("--export-only", action="store_true")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    import onnxruntime

    folder = Path(args.build)
    folder.mkdir(parents=True, exist_ok=True)
    model, files = build(args.model, args.size, args.chunks, folder)
    if args.export_only:
        return
    if K.select_backend("selective_scan_2d", torch.device("cpu")) != "cpu":
        raise SystemExit("the compiled cpu scan kernel is not available here; build lesionkit._C first")
    machine = {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
               "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
               "load_average_before": os.getloadavg()}
    rows = []

    def write():
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"machine": machine, "model": args.model, "image_size": args.size, "repeats": args.repeats,
                           "baseline_export": args.baseline_label, "results": rows}, f, indent=1)

    def record(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        write()

    def time_onnx(path, chunk, batch, threads, **tags):
        """Time ``path`` in ONNX Runtime and record the row (``tags`` after "runtime")."""
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).random((batch, 3, args.size, args.size), dtype=np.float32)
        med, all_s = median_seconds(lambda: session.run(None, {"images": x}), args.repeats)
        record({"runtime": "onnxruntime-cpu", **tags, "scan_chunk": chunk, "batch": batch, "threads": threads,
                "s_median": med, "s_all": all_s, "images_per_s": batch / med, "file_mib": path.stat().st_size / 2**20})

    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batches:
            x = torch.rand(batch, 3, args.size, args.size)
            with torch.no_grad():
                med, all_s = median_seconds(lambda: model(x), args.repeats)
            record({"runtime": "pytorch-cpu-kernel", "batch": batch, "threads": threads, "s_median": med,
                    "s_all": all_s, "images_per_s": batch / med})
            chunks = args.chunks if (threads, batch) == (args.threads[0], args.batches[0]) else args.chunks[:1]
            for chunk in chunks:
                time_onnx(files[chunk], chunk, batch, threads)
                baseline = Path(args.baseline_build) / files[chunk].name if args.baseline_build else None
                if baseline is not None and baseline.is_file():
                    time_onnx(baseline, chunk, batch, threads, export="baseline")
    machine["load_average_after"] = os.getloadavg()
    write()


if __name__ == "__main__":
    main()
