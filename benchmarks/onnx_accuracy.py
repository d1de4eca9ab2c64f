"""ONNX Runtime (CPU) against PyTorch (cpu scan kernel) for the exported SS2D models: the max
|difference| of logits and probabilities, float32, seeded random weights (docs/ops.md, "Export
to ONNX"). tests/test_export_onnx.py asserts the same comparison at 1e-4.

    python benchmarks/onnx_accuracy.py --out benchmarks/results/NAME.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import torch

from lesionkit.engine.export import LogitsOnly, _export_onnx, probabilities
from lesionkit.models import create_model

CASES = ["vmunet_tiny:128", "cmssm_tiny:128", "vmunet_tiny:256", "cmssm_tiny:256", "vmunet:256"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=CASES, help="MODEL:SIZE")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--out")
    args = parser.parse_args()
    import onnxruntime

    torch.set_num_threads(1)
    rows = []
    for case in args.cases:
        name, size = case.split(":")
        size = int(size)
        torch.manual_seed(0)
        model = LogitsOnly(create_model(name)).eval()
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            path = Path(tmp) / "m.onnx"
            _, details = _export_onnx(model, torch.rand(1, 3, size, size), path, name)
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for batch in args.batches:
                x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
                want = model(x)
                (got,) = session.run(None, {"images": x.numpy()})
                got = torch.from_numpy(got)
                row = {"model": name, "image_size": size, "batch": batch, "opset": details["opset"],
                       "file_mib": details["size_bytes"] / 2**20,
                       "logits_max_abs_diff": (got - want).abs().max().item(),
                       "logits_max_abs": want.abs().max().item(),
                       "probabilities_max_abs_diff": (probabilities(got) - probabilities(want)).abs().max().item()}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                                   "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
                       "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
