"""What `lesionkit export --optimize` costs and buys (docs/engine.md): each SS2D model is traced
and translated to ONNX once, then a copy is tidied at each level (none / light / full); the
script reports the time of the tidying, the file size, the node count, ONNX Runtime's load time
and its run time on one image (CPU provider, alternating the three files, median), at the
given thread counts, and the largest logit difference from PyTorch.

    python benchmarks/onnx_optimize_levels.py --models vmunet_tiny cmssm_tiny --size 128 --out R.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vmunet_tiny", "cmssm_tiny"])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--work", default="onnx_optimize_levels", help="folder for the .onnx files")
    parser.add_argument("--out", help="JSON file for the results")
    args = parser.parse_args()

    import onnx_ir as ir
    import onnxruntime as ort

    from lesionkit.engine.export import ONNX_OPTIMIZE, LogitsOnly, _optimize_onnx, _translate_onnx
    from lesionkit.kernels.reference.export_scan import DEFAULT_CHUNK
    from lesionkit.models import create_model

    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "onnxruntime": ort.__version__, "size": args.size, "models": {}}
    for name in args.models:
        torch.manual_seed(0)
        model = LogitsOnly(create_model(name)).eval()
        pair = torch.rand(2, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
        x = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(2))
        t = time.perf_counter()
        with torch.no_grad():
            program = _translate_onnx(model, pair, DEFAULT_CHUNK)
        translate_s = time.perf_counter() - t
        with torch.no_grad():
            want = model(x).numpy()
        rows = {}
        for level in ONNX_OPTIMIZE:
            copy = torch.onnx.ONNXProgram(ir.from_proto(ir.to_proto(program.model)), None)
            t = time.perf_counter()
            _optimize_onnx(copy, level)
            tidy_s = time.perf_counter() - t
            path = work / f"{name}_{level}.onnx"
            ir.save(copy.model, path)
            rows[level] = {"tidy_s": tidy_s, "size_mib": path.stat().st_size / 2**20,
                           "nodes": sum(1 for _ in copy.model.graph)}
        for threads in args.threads:
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            sessions = {}
            for level in ONNX_OPTIMIZE:
                t = time.perf_counter()
                sessions[level] = ort.InferenceSession(str(work / f"{name}_{level}.onnx"), so,
                                                       providers=["CPUExecutionProvider"])
                rows[level][f"load_s_{threads}t"] = time.perf_counter() - t
                got = sessions[level].run(None, {"images": x.numpy()})[0]
                rows[level]["max_abs_diff"] = float(np.abs(got - want).max())
            times = {level: [] for level in sessions}
            for _ in range(args.runs):
                for level, s in sessions.items():
                    t = time.perf_counter()
                    s.run(None, {"images": x.numpy()})
                    times[level].append(time.perf_counter() - t)
            for level, v in times.items():
                rows[level][f"run_ms_{threads}t"] = 1e3 * statistics.median(v)
        report["models"][name] = {"translate_s": translate_s, "levels": rows}
        print(f"{name} at {args.size} px: traced and translated in {translate_s:.1f} s")
        for level, r in rows.items():
            runs = ", ".join(f"{r[f'run_ms_{t}t']:.1f} ms at {t} thread(s)" for t in args.threads)
            print(f"  {level:5s} tidied in {r['tidy_s']:5.1f} s, {r['size_mib']:5.1f} MiB, {r['nodes']} nodes; "
                  f"ONNX Runtime {runs}; max |logit difference| {r['max_abs_diff']:.1e}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
