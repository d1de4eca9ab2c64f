"""ONNX export of the SS2D models: the traceable scan, export_mode, and ONNX Runtime against PyTorch.

The exported scan (:mod:`lesionkit.kernels.reference.export_scan`) is held to the sequential
oracle first; then whole models go through ``torch.onnx.export`` and ONNX Runtime, and a
checkpoint from ``lesionkit train`` is exported by the CLI and run in a fresh process that
imports only onnxruntime and numpy.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import lesionkit.kernels as K
from lesionkit.kernels import _library
from lesionkit.kernels.backend import export_chunk_size, requested_backend
from lesionkit.kernels.reference import (
    selective_scan_2d_reference,
    selective_scan_sequential_reference,
)
from lesionkit.kernels.reference.export_scan import (
    prefix_scan,
    selective_scan_2d_export,
    selective_scan_export,
)

ROOT = Path(__file__).resolve().parents[1]
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="the onnx extra (onnx, onnxscript, onnxruntime) is not installed")


def scan_inputs(b, d, n, l, g, seed=0, dtype=torch.float32, a_scale=5.0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    A = -a_scale * torch.rand(d, n, generator=gen, dtype=dtype)
    return dict(u=r(b, d, l), delta=r(b, d, l), A=A, B=r(b, g, n, l), C=r(b, g, n, l), D=r(d), z=r(b, d, l),
                delta_bias=r(d))


# (b, d, n, l, groups, chunk): l of one step, below / above / not a multiple of the chunk, chunk 1.
SHAPES = [(2, 6, 5, 1, 1, 16), (1, 4, 3, 17, 2, 4), (2, 3, 16, 100, 1, 16), (1, 2, 4, 333, 1, 7),
          (1, 4, 2, 1000, 4, 64), (1, 2, 3, 31, 1, 1), (3, 2, 1, 64, 1, 64)]


@pytest.mark.parametrize("b,d,n,l,g,chunk", SHAPES)
@pytest.mark.parametrize("with_extras", [True, False], ids=["D-z-bias-softplus", "plain"])
def test_export_scan_matches_the_sequential_oracle(b, d, n, l, g, chunk, with_extras):
    args = scan_inputs(b, d, n, l, g)
    if not with_extras:
        # Without softplus dt is delta itself: positive, as a step size is (a negative dt makes
        # the recurrence grow without bound).
        args.update(D=None, z=None, delta_bias=None, delta=args["delta"].abs())
    want, want_state = selective_scan_sequential_reference(**args, delta_softplus=with_extras, return_last_state=True)
    got, got_state = selective_scan_export(**args, delta_softplus=with_extras, return_last_state=True,
                                           chunk_size=chunk)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_state, want_state, rtol=1e-5, atol=1e-5)


def test_export_scan_in_float64_is_exact_to_rounding():
    args = scan_inputs(2, 3, 4, 77, 1, dtype=torch.float64)
    want = selective_scan_sequential_reference(**args, delta_softplus=True)
    got = selective_scan_export(**args, delta_softplus=True, chunk_size=8)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_export_scan_stays_finite_for_large_decays_and_long_sequences():
    # |A| * dt up to ~2000 per step and 5000 steps: any exp of a positive cumulative sum would
    # overflow here; the multiplicative form only underflows toward zero, as the decay does.
    args = scan_inputs(1, 2, 3, 5000, 1, seed=3, a_scale=400.0)
    args["delta"] = args["delta"].abs() * 3
    want = selective_scan_sequential_reference(**args, delta_softplus=True)
    got = selective_scan_export(**args, delta_softplus=True, chunk_size=16)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prefix_scan_is_the_recurrence():
    a, b = torch.rand(3, 13), torch.randn(3, 13)
    prod, h = prefix_scan(a, b)
    state, want = torch.zeros(3), []
    for t in range(13):
        state = a[:, t] * state + b[:, t]
        want.append(state)
    torch.testing.assert_close(h, torch.stack(want, -1))
    torch.testing.assert_close(prod, torch.cumprod(a, -1))


@pytest.mark.parametrize("shape,chunk", [((2, 5, 7, 9), 8), ((1, 3, 1, 13), 4), ((1, 4, 16, 16), 16)])
def test_export_scan_2d_matches_the_oracle(shape, chunk):
    gen = torch.Generator().manual_seed(1)
    b, d, h, w = shape
    n = 3
    x = torch.randn(b, d, h, w, generator=gen)
    dt = torch.randn(b, 4, d, h, w, generator=gen)
    A = -4 * torch.rand(4, d, n, generator=gen)
    B, C = torch.randn(2, b, 4, n, h, w, generator=gen)
    D, dt_bias = torch.randn(2, 4, d, generator=gen)
    want = selective_scan_2d_reference(x, dt, A, B, C, D, dt_bias, True, sequential=True)
    got = selective_scan_2d_export(x, dt, A, B, C, D, dt_bias, True, chunk_size=chunk)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_export_scan_names_a_bad_chunk_size():
    args = scan_inputs(1, 2, 2, 8, 1)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size should be a positive int"):
            selective_scan_export(**args, chunk_size=bad)
    with pytest.raises(ValueError, match="chunk_size should be a positive int"):
        with K.export_mode(0):
            pass


class ScanModel(torch.nn.Module):
    """The SS2D core with fixed parameters, as SS2D calls it."""

    def __init__(self, d=4, n=3):
        super().__init__()
        gen = torch.Generator().manual_seed(2)
        self.A = torch.nn.Parameter(-4 * torch.rand(4, d, n, generator=gen))
        self.D = torch.nn.Parameter(torch.randn(4, d, generator=gen))
        self.bias = torch.nn.Parameter(torch.randn(4, d, generator=gen))
        self.proj = torch.nn.Conv2d(d, 4 * (d + 2 * n), 1)
        self.d, self.n = d, n

    def forward(self, x):
        b, d, h, w = x.shape
        p = self.proj(x).view(b, 4, d + 2 * self.n, h, w)
        dt, B, C = torch.split(p, [d, self.n, self.n], dim=2)
        return K.selective_scan_2d(x, dt, self.A, B.contiguous(), C.contiguous(), self.D, self.bias)


def _graph_size(model, x):
    return len(torch.export.export(model, (x,)).graph.nodes)


def test_export_mode_traces_plain_ops_with_no_loop_over_the_length():
    model = ScanModel().eval()
    small, large = torch.rand(1, 4, 8, 8), torch.rand(1, 4, 64, 64)
    with torch.no_grad():
        want = model(large)
        with K.export_mode(16):
            assert requested_backend() == "reference" and export_chunk_size() == 16
            got = model(large)
            program = torch.export.export(model, (large,))
            n_small, n_large = _graph_size(model, small), len(program.graph.nodes)
    assert export_chunk_size() is None  # the block is left as it was entered
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not [op for op in ops if "lesionkit" in op], ops
    # 64 times the sequence (64 -> 4096 steps) adds log2(64) = 6 rounds to the scan across the
    # chunks, a few nodes each; a loop over the steps would add thousands.
    assert n_large - n_small < 120, (n_small, n_large)


def test_export_scan_writes_the_states_a_fixed_number_of_times():
    # The (b, 4 d, n, l) states are what ONNX Runtime spends its time on: stepping within the
    # chunks writes them a fixed handful of times (decays, inputs, the stacked states, the
    # decays from the chunk start, the entering states' share, the output products), where a
    # prefix scan over each chunk's steps wrote them 26 times (pad, multiply, add in each round).
    model = ScanModel(d=4, n=3).eval()
    counts = []
    for side in (8, 64):
        with torch.no_grad(), K.export_mode(16):
            program = torch.export.export(model, (torch.rand(1, 4, side, side),))
        state_size = 4 * model.d * model.n * side * side  # 4 directions x d x n x l
        counts.append(sum(1 for node in program.graph.nodes if node.op == "call_function"
                          and isinstance(node.meta.get("val"), torch.Tensor) and node.meta["val"].numel() >= state_size))
    assert counts[0] == counts[1] <= 10, counts


# --- whole models through ONNX Runtime ------------------------------------------------------


def _onnx_vs_torch(name, size, tmp_path, batches=(3,), optimize="light"):
    """Export a fresh (seeded) model with export_mode and return the probabilities' max |difference|
    over batches of 1 and 2 (the export's own check) and of each size in ``batches``, the graph tidied
    as `lesionkit export` does by default (``optimize="light"``)."""
    import onnxruntime

    from lesionkit.engine.export import LogitsOnly, _export_onnx, probabilities
    from lesionkit.models import create_model

    torch.manual_seed(0)
    model = LogitsOnly(create_model(name)).eval()
    out = tmp_path / f"{name}.onnx"
    with torch.no_grad():
        sample = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(5))
        _, details = _export_onnx(model, sample, out, name, optimize=optimize)
        assert details["batches_checked"] == [1, 2]
        worst = details["probabilities_max_abs_diff"]
        if batches:
            session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        for batch in batches:
            x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
            (logits,) = session.run(None, {"images": x.numpy()})
            want = probabilities(model(x))  # the default backend: the cpu kernel where built
            assert logits.shape == tuple(want.shape)
            worst = max(worst, (probabilities(torch.from_numpy(logits)) - want).abs().max().item())
    return worst


@needs_onnx
@pytest.mark.slow
# Each model family at 128 px, and the full VM-UNet at the paper's 256 px (longer scans, more
# chunks); the tiny models at 256 px added 100 s to the slow stage and no path the others miss.
@pytest.mark.parametrize("name,size", [("vmunet_tiny", 128), ("cmssm_tiny", 128), ("vmunet", 256)])
def test_onnx_runtime_reproduces_pytorch_probabilities(name, size, tmp_path, one_thread):
    # The export itself runs ONNX Runtime on batches of 1 and 2; the tiny models also on 3.
    batches = () if name == "vmunet" else (3,)
    assert _onnx_vs_torch(name, size, tmp_path, batches) <= 1e-4


# --- the CLI, and a process without torch or lesionkit --------------------------------------

RUN_WITHOUT_TORCH = textwrap.dedent("""
    import json, sys
    import numpy as np
    import onnxruntime as ort

    onnx_file, inputs_file, probs_file = sys.argv[1:]
    session = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: np.load(inputs_file)})
    probs = 1.0 / (1.0 + np.exp(-logits))
    diff = float(np.abs(probs - np.load(probs_file)).max())
    print(json.dumps({"max_abs_diff": diff, "shape": list(probs.shape),
                      "torch": "torch" in sys.modules, "lesionkit": any(m.startswith("lesionkit") for m in sys.modules)}))
""")


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "lesionkit", *map(str, args)], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-3000:]}"
    return result


@needs_onnx
@pytest.mark.slow
def test_trained_vmunet_tiny_runs_in_onnx_runtime_without_torch(tmp_path, one_thread):
    from lesionkit.engine.checkpoint import load_checkpoint, model_from_checkpoint
    from lesionkit.engine.export import LogitsOnly, probabilities

    run_cli("train", "--model", "vmunet_tiny", "--data", "synthetic:8:0", "--val-data", "synthetic:4:1",
            "--image-size", "64", "--epochs", "1", "--batch-size", "4", "--out", tmp_path / "run", "--no-progress",
            "--set", "data.num_workers=0")
    checkpoint = tmp_path / "run" / "best.pt"
    result = run_cli("export", "--checkpoint", checkpoint, "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert "opset" in result.stdout and "ONNX Runtime" in result.stdout and "MiB" in result.stdout, result.stdout

    state = load_checkpoint(checkpoint)
    model = LogitsOnly(model_from_checkpoint(state, checkpoint)).eval()
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        probs = probabilities(model(images))
    np.save(tmp_path / "images.npy", images.numpy())
    np.save(tmp_path / "probs.npy", probs.numpy())
    script = tmp_path / "run_onnx.py"
    script.write_text(RUN_WITHOUT_TORCH)
    # -I: isolated, so neither PYTHONPATH nor the working directory can bring lesionkit in.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-I", str(script), str(tmp_path / "m.onnx"), str(tmp_path / "images.npy"),
                           str(tmp_path / "probs.npy")], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["torch"] is False and report["lesionkit"] is False
    assert report["shape"] == [3, 1, 64, 64]
    assert report["max_abs_diff"] <= 1e-4, report
