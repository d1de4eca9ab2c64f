"""Deliberate wiring bugs, each of which must make the test suite fail (issue 19).

For every entry of :data:`BREAKAGES` the package and its tests are copied to a temporary
directory, the entry's text substitution is applied to the copy (a target that is not found, or
found more than once, is an error: the breakage would silently test nothing), and the entry's
tests run against the copy in a fresh process. A breakage is *caught* when pytest reports failed
tests (exit code 1); a collection or usage error does not count. The same tests are first run
on the unmodified copy and must pass there, so that a failure is the breakage's doing (in one
pytest process, their selections joined into one -k expression: 10 s instead of 69 s for
fifteen processes).

    python tests/wiring_breakages.py            # every breakage
    python tests/wiring_breakages.py cra_height_gate_dropped vmunet_skips_zeroed

``tests/test_wiring_breakages.py`` runs it in the slow stage (``make test-slow``). To add one,
append a :class:`Breakage` to :data:`BREAKAGES` (or to a list of your own passed to
:func:`run_breakages`); keep ``tests`` to the few files or test ids that should catch it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What a test run needs from the checkout (the compiled extension travels inside lesionkit/).
COPIED = ("lesionkit", "tests", "pyproject.toml", "configs", "docs", "README.md")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")


@dataclass(frozen=True)
class Breakage:
    name: str
    file: str  # relative to the repository root
    old: str  # replaced exactly once
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, or "-k", "expr"
    why: str = ""


BREAKAGES: list[Breakage] = [
    Breakage(
        "amlp_patch_mask_ignored", "lesionkit/models/amlp.py",
        "            x = self.mask_input(x, patch_mask)\n", "            self.mask_input(x, patch_mask)\n",
        ("tests/test_amlp.py",),
        "AMLPUNet.forward checks the mask but runs on the whole image"),
    Breakage(
        "vmunet_skips_zeroed", "lesionkit/models/vmunet.py",
        "x = x + skip\n", "x = x + 0 * skip\n",
        ("tests/test_vmunet.py", "-k", "official"),
        "the decoder gets no encoder skips"),
    Breakage(
        "patch_merging_order", "lesionkit/layers/vss_patches.py",
        "[x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]",
        "[x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]]",
        ("tests/test_vmunet.py", "-k", "official"),
        "the 2x2 neighbours concatenated in another order than VM-UNet's (its checkpoints expect x0, x1, x2, x3)"),
    Breakage(
        "cra_height_gate_dropped", "lesionkit/layers/cross_region_attention.py",
        "return x * g_h * g_w", "return x * g_w",
        ("tests/test_cross_region_attention.py",),
        "Eq. 7 without g^h"),
    Breakage(
        "residual_map_plain_mean", "lesionkit/layers/residual_maps.py",
        "pixels = mae.patch_pixels(total / count.clamp_min(1))",
        "pixels = mae.patch_pixels(total / n)",
        ("tests/test_residual_maps.py", "-k", "not command"),
        "Eq. 3-5: the masked runs' sum divided by all n runs instead of by the runs that masked the patch"),
    Breakage(
        "maps_unhidden_patch_residual", "lesionkit/layers/residual_maps.py",
        "res = torch.where(count > 0, res, 0.0)", "res = res",
        ("tests/test_residual_maps.py", "-k", "not command"),
        "Eq. 4: a patch no masking hid compared with the pixel head's output for a zero feature "
        "instead of keeping its own pixels (residual 0)"),
    Breakage(
        "amlp_features_ignored", "lesionkit/engine/trainers/amlp.py",
        'if recipe.features == "pixels":', "if True:",
        ("tests/test_amlp_trainer.py", "-k", "features"),
        "MPS clusters the pixels whatever amlp.features says"),
    Breakage(
        "resume_forgets_bad_epochs", "lesionkit/engine/resume.py",
        '        self.bad_epochs = int(state["bad_epochs"])\n', "",
        ("tests/test_trainer_checkpoints.py", "-k", "every_field"),
        "early stopping's patience restarts after a resume"),
    Breakage(
        "resume_restarts_the_clock", "lesionkit/engine/resume.py",
        '        self.elapsed_before = float(state["elapsed"])\n', "",
        ("tests/test_trainer_checkpoints.py", "-k", "every_field"),
        "the time budget forgets the time spent before the resume"),
    Breakage(
        "cmssm_gates_default_init", "lesionkit/models/vmunet.py",
        "                m.init_gate(sw.gate_init)\n", "                pass\n",
        ("tests/test_cmssm.py", "-k", "initialisation or identities"),
        "SE and CRA keep PyTorch's default init: CM-SSM no longer starts as VM-UNet"),
    Breakage(
        "cmssm_cmn_not_zero_init", "lesionkit/models/vmunet.py",
        "                m.zero_init_output()\n", "                pass\n",
        ("tests/test_cmssm.py", "-k", "initialisation or identities"),
        "the Channel Mixing branch starts random instead of at zero"),
    Breakage(
        "ifd_ranked_not_halves", "lesionkit/losses/feature_distillation.py",
        'def internal_feature_distillation(features: Sequence[torch.Tensor], split: str = "halves")',
        'def internal_feature_distillation(features: Sequence[torch.Tensor], split: str = "ranked")',
        ("tests/test_cmssm.py", "-k", "ifd or distillation"),
        "IFD sorts the channels instead of splitting them into halves (Eq. 9's text)"),
    Breakage(
        "fd_distils_d1", "lesionkit/losses/feature_distillation.py",
        "keep = [i for i, s in enumerate(stages) if s != final]", "keep = list(range(len(stages)))",
        ("tests/test_cmssm.py", "-k", "distillation"),
        "the teacher D1 is also a student (Eq. 8-9 list E1(1) .. D2(2))"),
    Breakage(
        "fd_one_map_per_stage", "lesionkit/models/vmunet.py",
        "            features.append(x.permute(0, 3, 1, 2))\n",
        "            features.append(x.permute(0, 3, 1, 2)) if blk is blocks[-1] else None\n",
        ("tests/test_cmssm.py", "-k", "intermediates"),
        "forward_intermediates returns a stage's last block only, not every block"),
    Breakage(
        "fd_start_ignored", "lesionkit/engine/trainers/cmssm.py",
        "return bool(self.fd_terms) and self.global_step >= self.fd_start_step", "return bool(self.fd_terms)",
        ("tests/test_cmssm.py", "-k", "warm_up"),
        "cmssm.fd_start_epochs / fd_start_steps do not delay the distillation"),
    Breakage(
        "amlp_ccl_on_every_masked_patch", "lesionkit/engine/trainers/amlp.py",
        'ccl = category_consistency_loss(out.extras["patch_logits"].float(), label_new, patches)',
        'ccl = category_consistency_loss(out.extras["patch_logits"].float(), label_new, mask)',
        ("tests/test_amlp_paper_readings.py",),
        "CCL on every masked patch, not where label_new != label_ori (Sec. 3.3)"),
    Breakage(
        "amlp_amr_per_epoch", "lesionkit/engine/trainers/amlp.py",
        "epoch = 1.0 + self.global_step / self.steps_per_epoch if epoch is None else epoch",
        "epoch = self.epoch + 1 if epoch is None else epoch",
        ("tests/test_amlp_trainer.py", "-k", "amr"),
        "AMR's ratio jumps once an epoch instead of growing every step"),
    Breakage(
        "final_head_ln_backward_xhat_term", "lesionkit/layers/vss_patches.py",
        "grad_rows = torch.addcmul(centred.t() @ g_rstd, xc, coef, value=-1)",
        "grad_rows = centred.t() @ g_rstd",
        ("tests/test_vmunet.py", "-k", "final_head"),
        "the folded final LayerNorm + head's backward without the LayerNorm's xhat term"),
    Breakage(
        "maps_last_block_keys_unnormalised", "lesionkit/layers/mae_decoder.py",
        "kv = nn.functional.linear(h, w[width:]", "kv = nn.functional.linear(x, w[width:]",
        ("tests/test_residual_maps.py", "-k", "not command"),
        "the decoder's selected-token last block takes keys and values from the un-normalised tokens"),
    Breakage(
        "onednn_linear_weight_grad_transposed", "lesionkit/layers/linear.py",
        "return _onednn_linear(x.t(), g.t()).t().contiguous()  # (x^T g)^T",
        "return _onednn_linear(g.t(), x.t()).t().contiguous().view(g.shape[1], x.shape[1])",
        ("tests/test_linear.py",),
        "the oneDNN linear's weight gradient laid out as (K, N) read as (N, K)"),
]


@dataclass
class Outcome:
    breakage: Breakage
    returncode: int
    seconds: float
    failed: list[str]
    tail: str

    @property
    def caught(self) -> bool:
        return self.returncode == 1 and bool(self.failed)


def copy_checkout(dest: Path) -> None:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=IGNORED)
        elif src.exists():
            shutil.copy2(src, dest / name)


def apply(breakage: Breakage, root: Path) -> None:
    path = root / breakage.file
    text = path.read_text()
    count = text.count(breakage.old)
    if count != 1:
        raise ValueError(f"breakage {breakage.name!r}: {breakage.old!r} occurs {count} times in {breakage.file} "
                         "(expected once); update the entry to the current code")
    path.write_text(text.replace(breakage.old, breakage.new))


def run_pytest(root: Path, args: tuple[str, ...]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p", "no:cacheprovider", "-m", "not slow", *args]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)


def check_import(root: Path) -> None:
    """The copy, not the editable install, must be what the tests import."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", "import lesionkit; print(lesionkit.__file__)"], cwd=root, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(root.resolve()):
        raise RuntimeError(f"the copy in {root} imports lesionkit from {out}, not from the copy")


def _selection_term(tests: tuple[str, ...]) -> tuple[list[str], str] | None:
    """``tests`` as (its files, one term of a pytest -k expression), or None where it has no
    such form: files (matched by their names, which -k sees as a parent of each test) and at
    most one -k."""
    files, expr, rest = [], None, list(tests)
    while rest:
        arg = rest.pop(0)
        if arg == "-k" and rest and expr is None:
            expr = rest.pop(0)
        elif arg.endswith(".py") and not arg.startswith("-"):
            files.append(arg)
        else:
            return None
    if not files:
        return None
    term = " or ".join(Path(f).name for f in files)
    return files, (f"(({term}) and ({expr}))" if expr else f"({term})")


def baseline_runs(selections: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """The pytest argument lists that together run every selection once: the selections that
    combine (:func:`_selection_term`) as one run, the others as they are."""
    combined_files: dict[str, None] = {}
    terms, alone = [], []
    for tests in dict.fromkeys(selections):
        parsed = _selection_term(tests)
        if parsed is None:
            alone.append(tests)
            continue
        files, term = parsed
        terms.append(term)
        combined_files.update(dict.fromkeys(files))
    runs = [(*combined_files, "-k", " or ".join(terms))] if terms else []
    return runs + alone


def run_breakages(breakages: list[Breakage] = BREAKAGES, log=print) -> list[Outcome]:
    with tempfile.TemporaryDirectory(prefix="lesionkit-breakages-") as tmp:
        clean = Path(tmp) / "clean"
        copy_checkout(clean)
        check_import(clean)
        for b in breakages:  # every target must be there before anything runs
            if (clean / b.file).read_text().count(b.old) != 1:
                apply(b, clean)  # raises, naming the entry
        # Each entry's tests must pass on the unmodified copy: one pytest process for all of them
        # where their selections combine into one -k expression (a process costs seconds to start).
        start = time.perf_counter()
        for tests in baseline_runs([b.tests for b in breakages]):
            baseline = run_pytest(clean, tests)
            if baseline.returncode != 0:
                raise RuntimeError(f"tests {' '.join(tests)} fail on the unmodified copy:\n{baseline.stdout[-4000:]}")
        log(f"baseline: the tests pass on the unmodified copy ({time.perf_counter() - start:.0f} s)")
        outcomes = []
        for b in breakages:
            work = Path(tmp) / b.name
            shutil.copytree(clean, work)
            apply(b, work)
            start = time.perf_counter()
            proc = run_pytest(work, b.tests)
            failed = re.findall(r"^FAILED (\S+)", proc.stdout, flags=re.M)
            outcome = Outcome(b, proc.returncode, time.perf_counter() - start, failed, proc.stdout[-2000:])
            outcomes.append(outcome)
            verdict = "caught" if outcome.caught else f"NOT CAUGHT (pytest exit code {proc.returncode})"
            log(f"{b.name}: {verdict} in {outcome.seconds:.0f} s" + (f" by {failed[0]}" if failed else ""))
            shutil.rmtree(work)
        return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"breakages to run (default all): {[b.name for b in BREAKAGES]}")
    args = parser.parse_args(argv)
    known = {b.name: b for b in BREAKAGES}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown breakage(s) {unknown}; known: {list(known)}")
    outcomes = run_breakages([known[n] for n in args.names] if args.names else BREAKAGES)
    missed = [o for o in outcomes if not o.caught]
    for o in missed:
        print(f"\n--- {o.breakage.name} ({o.breakage.why}) was not caught; pytest said:\n{o.tail}")
    print(f"{len(outcomes) - len(missed)} of {len(outcomes)} breakages caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
