"""Property tests and bad-input catalogues for lesionkit ops, through one helper.

Every op (existing and new) describes itself once as an :class:`OpProperty`; the helper turns it
into hypothesis tests that run every available backend against the reference, forward and
backward, and into a bad-input catalogue run in a subprocess (a kernel crash fails the test
instead of killing pytest).

Adding an op
------------
1. Write ``cases``: a hypothesis strategy of plain, printable parameters (a ``dict`` of ints,
   strings, bools) - sizes from :func:`sizes` (1 and odd sizes come first), a dtype name from
   :func:`dtypes`, a memory layout from :func:`layouts`, the op's flags and value ranges, a
   ``seed``. Keep tensors out of the case: a failing case then prints as a readable dict and can
   be pasted into ``regressions``.
2. Write ``build(case, device) -> dict``: the keyword arguments of the public function, made
   deterministically from the case (use :func:`generator` and :func:`with_layout`).
3. Fill in the :class:`OpProperty` (``call`` is the public ``lesionkit.kernels`` function,
   ``grad_inputs`` the keyword arguments to differentiate, ``tolerance`` (rtol, atol) per
   dtype, measured with a margin), and list ``bad_inputs``: :class:`BadInput` entries, each a
   function of the device returning keyword arguments that must raise ``error`` matching
   ``match`` on every backend.
4. In a test module: ``test_x = property_test(PROP)``, and the op's name in the module's one
   ``test_bad_inputs = catalogue_test("module_name", ["PROP", ...])`` (the subprocess
   re-imports the module to find the entries).

Profiles
--------
``LESIONKIT_HYPOTHESIS_PROFILE`` picks one: ``ci`` (default; ``OpProperty.ci_examples`` per op
and backend, ``derandomize=True``: the same examples on every run, no database) or ``soak``
(``soak_examples``, random, for long local runs: ``LESIONKIT_HYPOTHESIS_PROFILE=soak pytest
tests/test_op_properties.py``). Every counterexample a run finds goes into the op's
``regressions`` list, which is replayed as ``@example`` cases before any generated one.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import lesionkit.kernels as K

from conftest import kernel_backends

PROFILE = os.environ.get("LESIONKIT_HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "soak"):
    raise ValueError(f"LESIONKIT_HYPOTHESIS_PROFILE should be ci or soak, got {PROFILE!r}")

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded", "channels_last")
TESTS_DIR = Path(__file__).resolve().parent


def sizes(low: int = 1, high: int = 9) -> st.SearchStrategy[int]:
    """Sizes in [low, high]; shrinking (and the derandomized draws) start at 1 and odd sizes."""
    return st.integers(low, high)


def dtypes(*names: str) -> st.SearchStrategy[str]:
    return st.sampled_from(names or ("float32", "float64"))


def layouts(*names: str) -> st.SearchStrategy[str]:
    return st.sampled_from(names or LAYOUTS)


def generator(case: dict) -> torch.Generator:
    return torch.Generator().manual_seed(case.get("seed", 0))


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """`t`'s values with another memory layout (its shape unchanged).

    ``transposed``: the last two dims swapped in storage; ``sliced``: every other element of a
    twice-as-long last dim; ``expanded``: dim 0 broadcast with stride 0 from its first entry
    (the values of the other entries become copies of it); ``channels_last``: for 4-D tensors
    (else ``transposed``).
    """
    if layout == "contiguous" or t.dim() == 0:
        return t.contiguous()
    if layout == "expanded":
        return t[:1].expand(t.shape)
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout in ("transposed", "channels_last") and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


@dataclass(frozen=True)
class BadInput:
    """Keyword arguments (from ``make(device)``) the op must reject with ``error`` matching
    ``match``; with ``error=None`` the op must instead run and ``expect(output)`` be true (NaN
    propagates, an empty input gives an empty output)."""

    name: str
    make: Callable[[torch.device], dict]
    match: str
    error: type[BaseException] | None = ValueError
    expect: Callable[[object], bool] | None = None


@dataclass(frozen=True)
class OpProperty:
    """One op as the property tests and the bad-input catalogue see it (see the module doc)."""

    op: str  # the name registered with lesionkit.kernels.backend
    call: Callable[..., torch.Tensor | tuple]
    cases: st.SearchStrategy[dict]
    build: Callable[[dict, torch.device], dict]
    grad_inputs: tuple[str, ...]  # () for an op without a gradient (then no backward check)
    tolerance: Callable[[torch.dtype, str], tuple[float, float]]  # (dtype, "forward"|"backward")
    bad_inputs: tuple[BadInput, ...] = ()
    regressions: tuple[dict, ...] = ()
    ci_examples: int = 12
    soak_examples: int = 500
    extra_backends: tuple[tuple[str, torch.device], ...] = field(default=())


def _outputs(out) -> list[torch.Tensor]:
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]


def _dtype_of(kwargs: dict) -> torch.dtype:
    return next(v.dtype for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dtype.is_floating_point)


def check_case(prop: OpProperty, case: dict, backend: str, device: torch.device) -> None:
    """``backend`` on ``device`` against the reference on the same values in float64, forward
    and backward (the cotangent is rounded to the output's dtype first)."""
    kwargs = prop.build(case, device)
    dtype = _dtype_of(kwargs)
    # The reference sees the very same values in float64, so the comparison measures the
    # kernel's own rounding only (a 16-bit reference would add its own, often larger, error).
    ref_kwargs = {k: (v.detach().cpu().double() if isinstance(v, torch.Tensor) and v.dtype == dtype else
                      v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    grads = [k for k in prop.grad_inputs if kwargs.get(k) is not None]
    for k in grads:
        kwargs[k] = kwargs[k].detach().requires_grad_()
        ref_kwargs[k] = ref_kwargs[k].detach().requires_grad_()
    with K.use_backend(backend):
        got = _outputs(prop.call(**kwargs))
    with K.use_backend("reference"):
        want = _outputs(prop.call(**ref_kwargs))
    assert len(got) == len(want)
    rtol, atol = prop.tolerance(dtype, "forward")
    for g, w in zip(got, want):
        assert g.dtype == w.dtype or w.dtype == torch.float64, (g.dtype, w.dtype)
        assert g.shape == w.shape, (g.shape, w.shape)
        torch.testing.assert_close(g.detach().cpu().double(), w.detach().double(), rtol=rtol, atol=atol)
    if not grads:
        return  # this op (grad_inputs=()) or this case (the optional inputs absent) has nothing to differentiate
    # Differentiable inputs make a differentiable output, on every backend: an output without a
    # gradient here is a kernel that lost its autograd registration, not a case to skip.
    for name, out in (("the reference", want[0]), (f"backend {backend!r}", got[0])):
        assert out.requires_grad, (f"{prop.op}: {name}'s output does not require grad although {grads} do; "
                                   "an op with no gradient should say so with grad_inputs=()")
    cotangent = torch.randn(want[0].shape, generator=generator(case), dtype=torch.float64).to(got[0].dtype)
    got_grads = torch.autograd.grad(got[0], [kwargs[k] for k in grads], cotangent.to(got[0].device))
    want_grads = torch.autograd.grad(want[0], [ref_kwargs[k] for k in grads], cotangent.to(want[0].dtype))
    rtol, atol = prop.tolerance(dtype, "backward")
    for k, g, w in zip(grads, got_grads, want_grads):
        torch.testing.assert_close(g.cpu().double(), w.double(), rtol=rtol, atol=atol, msg=lambda m, k=k: f"d{k}: {m}")


def backends_for(prop: OpProperty) -> list:
    """pytest params: every kernel backend that can run the op here (the reference is the oracle)."""
    pairs = list(kernel_backends(prop.op)) + list(prop.extra_backends)
    return [pytest.param(b, d, id=f"{b}-{d.type}") for b, d in pairs]


def property_test(prop: OpProperty):
    """A pytest test: ``prop``'s regressions, then generated cases, on every backend."""
    examples = prop.ci_examples if PROFILE == "ci" else prop.soak_examples
    profile = settings(max_examples=examples, derandomize=PROFILE == "ci", deadline=None,
                       database=None, print_blob=True,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

    @pytest.mark.parametrize("backend,device", backends_for(prop))
    @profile
    @given(case=prop.cases)
    def test(backend, device, case):
        check_case(prop, case, backend, device)

    for regression in reversed(prop.regressions):
        test = example(case=regression)(test)
    test.__name__ = f"test_{prop.op}_properties"
    return test


# --------------------------------------------------------------------------- bad-input catalogue

def run_catalogue(prop: OpProperty, backend: str, device: torch.device) -> list[dict]:
    """Every bad input of ``prop`` on ``backend``: one result dict per entry."""
    results = []
    for bad in prop.bad_inputs:
        print(f"running {bad.name} on {backend}", flush=True)  # a crash leaves the culprit as the last line
        expected = bad.error if bad.error is not None else ()
        try:
            kwargs = bad.make(device)
            with K.use_backend(backend):
                out = prop.call(**kwargs)
                out = out[0] if isinstance(out, tuple) else out
                if out.is_cuda:
                    torch.cuda.synchronize()  # a device-side fault surfaces here, in this entry
        except expected as exc:
            ok = re.search(bad.match, str(exc)) is not None
            results.append({"name": bad.name, "ok": ok, "got": f"{type(exc).__name__}: {exc}"[:500]})
        except BaseException as exc:  # noqa: BLE001 - reported, not swallowed
            results.append({"name": bad.name, "ok": False,
                            "got": f"{type(exc).__name__}: {exc}"[:500] + "\n" + traceback.format_exc()[-1500:]})
        else:
            if bad.error is not None:
                results.append({"name": bad.name, "ok": False, "got": "no error raised"})
            else:
                ok = bool(bad.expect(out)) if bad.expect is not None else True
                results.append({"name": bad.name, "ok": ok, "got": f"output {tuple(out.shape)} {out.dtype}"})
    return results


def catalogue_test(module: str, names: list[str]):
    """A pytest test, parametrized by op, running the ``bad_inputs`` of the :class:`OpProperty`
    objects ``module.<name>`` for each name on every backend.

    All of them run in one subprocess (started once per pytest run, by the first op's test); if
    it dies, every op's test fails, showing the entry that was running.
    """
    @functools.cache
    def results() -> tuple[int, str, str, dict]:
        code = (f"import sys, json; sys.path.insert(0, {str(TESTS_DIR)!r}); import op_properties as h; "
                f"import {module} as m; print('RESULTS ' + json.dumps(h.run_catalogues(m, {names!r})))")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR.parent), str(TESTS_DIR)])}
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULTS ")]
        return run.returncode, run.stdout, run.stderr, json.loads(lines[-1][8:]) if lines else {}

    @pytest.mark.parametrize("name", names)
    def test(name):
        returncode, stdout, stderr, by_op = results()
        assert returncode == 0 and name in by_op, (
            f"the catalogue process died (exit {returncode}); last output:\n{stdout[-2000:]}\n{stderr[-3000:]}")
        failures = [r for r in by_op[name] if not r["ok"]]
        assert not failures, "\n".join(f"[{r['backend']}] {r['name']}: {r['got']}" for r in failures)

    return test


def run_catalogues(module, names: list[str]) -> dict[str, list[dict]]:
    """Run in the subprocess: every named op's catalogue on the reference and each kernel backend."""
    out = {}
    for name in names:
        prop = getattr(module, name)
        pairs = [("reference", torch.device("cpu"))] + list(kernel_backends(prop.op))
        print(f"op {name}", flush=True)
        out[name] = [dict(r, backend=b) for b, d in pairs for r in run_catalogue(prop, b, d)]
    return out
