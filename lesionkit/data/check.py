"""``lesionkit data check SPEC``: find the files that would break or skew training before it starts.

Two levels, after nnU-Net's dataset integrity check:

- :func:`check_headers` opens every image and mask header only (milliseconds per file): missing
  or unreadable files and image / mask size mismatches. ``lesionkit train`` runs it before the
  first epoch, so a broken file fails the run in seconds.
- :func:`check_dataset` decodes every image and mask once, in parallel: also truncated files,
  masks with values other than background and one foreground value, empty masks and images
  whose lesion fraction is an outlier of the dataset.

Unreadable files and size mismatches are errors (the loader would fail on them); the rest are
warnings (the loader binarises masks at > 127 and trains on empty ones, but they are often
export mistakes worth a look).
"""

from __future__ import annotations

import argparse
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ERRORS = ("unreadable", "size_mismatch")
WARNINGS = ("non_binary_mask", "empty_mask", "lesion_fraction_outlier")
FIXES = {
    "unreadable": "re-export or re-download the file, or remove the sample",
    "size_mismatch": "resize the mask to the image's size with nearest-neighbour interpolation, or pair the right files",
    "non_binary_mask": "threshold the mask (lesionkit reads > 127 as lesion, 1 in 0/1 masks) and save it as 0/255 PNG",
    "empty_mask": "check the annotation: the image has no lesion pixel",
    "lesion_fraction_outlier": "check the annotation: the lesion covers an unusual share of the image",
}
# A lesion fraction is an outlier beyond this many interquartile ranges from the quartiles of
# log-odds fractions (ours; 3 is Tukey's "far out").
OUTLIER_IQR = 3.0


@dataclass
class Finding:
    sample: str
    problem: str
    file: str
    detail: str

    @property
    def is_error(self) -> bool:
        return self.problem in ERRORS


@dataclass
class CheckReport:
    checked: int
    findings: list[Finding] = field(default_factory=list)
    lesion_fractions: dict[str, float] = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.is_error]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if not f.is_error]

    def summary(self, limit: int = 20) -> str:
        lines = [f"checked {self.checked} samples: {len(self.errors)} error(s), {len(self.warnings)} warning(s)"]
        for f in (self.errors + self.warnings)[:limit]:
            lines.append(f"  {'ERROR' if f.is_error else 'warn '} {f.problem:<24} {f.sample}: {f.detail} ({f.file})")
        if len(self.findings) > limit:
            lines.append(f"  ... and {len(self.findings) - limit} more (--fix-report FILE lists them all)")
        return "\n".join(lines)

    def write_fix_report(self, path: str | Path) -> None:
        """JSON: every finding with a suggested fix, and the counts."""
        rows = [{**asdict(f), "severity": "error" if f.is_error else "warning", "fix": FIXES[f.problem]}
                for f in self.findings]
        Path(path).write_text(json.dumps({"checked": self.checked, "errors": len(self.errors),
                                          "warnings": len(self.warnings), "findings": rows}, indent=2))


def _samples(dataset) -> list[tuple[str, Path, Path]]:
    """(id, image file, mask file) of a file-backed dataset (ISIC, PH2, folder), or [] for others."""
    while hasattr(dataset, "dataset") and hasattr(dataset, "indices"):  # a Subset
        indices, dataset = dataset.indices, dataset.dataset
        return [_samples(dataset)[i] for i in indices] if hasattr(dataset, "samples") else []
    return list(getattr(dataset, "samples", []))


def _header_findings(sid: str, image: Path, mask: Path) -> list[Finding]:
    from lesionkit.data.image_io import image_header, mask_orientation

    headers = []
    for path in (image, mask):
        try:
            headers.append(image_header(path))
        except (ValueError, OSError) as err:
            return [Finding(sid, "unreadable", str(path), str(err).removeprefix(f"cannot read image file {path}: "))]
    try:  # the loader's pairing of the two sizes (EXIF orientation included)
        mask_orientation(image, mask, *headers)
    except ValueError as err:
        return [Finding(sid, "size_mismatch", str(mask), str(err).removeprefix("image and mask sizes differ: "))]
    return []


def check_headers(dataset) -> CheckReport:
    """Every sample's image and mask header: unreadable files and size mismatches (no decoding)."""
    samples = _samples(dataset)
    report = CheckReport(checked=len(samples))
    for sid, image, mask in samples:
        report.findings += _header_findings(sid, image, mask)
    return report


def check_files(dataset, spec: str) -> None:
    """The header-only part of ``lesionkit data check``: a missing, unreadable or mismatched file
    fails the run before the first epoch instead of hours into it."""
    report = check_headers(dataset)
    if report.errors:
        raise ValueError(f"data {spec!r}: {report.summary()}\n(`lesionkit data check {spec}` decodes every file "
                         "and lists all problems)")


def _decode(sample: tuple[str, Path, Path]) -> tuple[list[Finding], float | None]:
    from lesionkit.data.image_io import mask_foreground, mask_levels

    sid, image, mask = sample
    found = _header_findings(sid, image, mask)
    if found:
        return found, None
    try:
        with Image.open(image) as img:
            img.load()
    except Exception as err:  # truncated data only shows when decoding
        return [Finding(sid, "unreadable", str(image), f"decoding failed: {err}")], None
    try:
        # The loader's own reading (1-bit, palette, 24-bit, 16-bit, 0/1 masks), so the check sees
        # the lesion the training run will see.
        with Image.open(mask) as img:
            a = mask_levels(img)
    except Exception as err:
        return [Finding(sid, "unreadable", str(mask), f"decoding failed: {err}")], None
    values = np.unique(a)
    findings = []
    if values.size > 2 or (values.size == 2 and values[0] != 0):
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if values.size > 6 else "")
        findings.append(Finding(sid, "non_binary_mask", str(mask), f"{values.size} distinct values ({shown})"))
    fraction = float(mask_foreground(a).mean()) if a.size else 0.0
    if fraction == 0.0:
        findings.append(Finding(sid, "empty_mask", str(mask), "no pixel above the lesion threshold"))
    return findings, fraction


def check_dataset(dataset, workers: int | None = None, progress: bool = True) -> CheckReport:
    """Decode every image and mask once (``workers`` threads) and report every problem found."""
    from tqdm import tqdm

    from lesionkit.host import available_cpus, on_terminal

    samples = _samples(dataset)
    report = CheckReport(checked=len(samples))
    workers = workers or max(1, available_cpus())
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_decode, samples)
        bar = tqdm(results, total=len(samples), desc="data check", disable=not (progress and on_terminal()),
                   mininterval=0.5)
        for (sid, _, _), (found, fraction) in zip(samples, bar):
            report.findings += found
            if fraction is not None:
                report.lesion_fractions[sid] = fraction
    report.findings += _fraction_outliers(report.lesion_fractions, {s[0]: s[2] for s in samples})
    return report


def _fraction_outliers(fractions: dict[str, float], masks: dict[str, Path]) -> list[Finding]:
    nonzero = {k: v for k, v in fractions.items() if v > 0}
    if len(nonzero) < 8:  # too few to call anything unusual
        return []
    eps = 1e-6
    logit = {k: math.log((v + eps) / (1 - v + eps)) for k, v in nonzero.items()}
    q1, q3 = np.percentile(list(logit.values()), [25, 75])
    low, high = q1 - OUTLIER_IQR * (q3 - q1), q3 + OUTLIER_IQR * (q3 - q1)
    out = []
    for sid, value in logit.items():
        if value < low or value > high:
            out.append(Finding(sid, "lesion_fraction_outlier", str(masks[sid]),
                               f"lesion covers {nonzero[sid]:.2%} of the image (the middle half of the data: "
                               f"{_sigmoid(q1):.1%}-{_sigmoid(q3):.1%})"))
    return out


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("check", help="decode every image and mask of a dataset and report problems",
                              description=__doc__.splitlines()[0])
    p.add_argument("spec", help="data spec, e.g. isic:PATH/isic2018:train, ph2:PATH, folder:PATH")
    p.add_argument("--fix-report", type=Path, metavar="FILE", help="write every finding with a suggested fix (JSON)")
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: the CPU count)")
    p.add_argument("--strict", action="store_true", help="exit non-zero on warnings too")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from lesionkit.data.spec import from_spec

    dataset = from_spec(args.spec)
    if not _samples(dataset):
        print(f"{args.spec}: {type(dataset).__name__} has no image / mask files to check")
        return 0
    report = check_dataset(dataset, workers=args.workers, progress=not args.no_progress)
    print(report.summary())
    if args.fix_report:
        report.write_fix_report(args.fix_report)
        print(f"wrote {args.fix_report}")
    return 1 if report.errors or (args.strict and report.warnings) else 0


__all__ = ["CheckReport", "Finding", "check_dataset", "check_files", "check_headers"]
