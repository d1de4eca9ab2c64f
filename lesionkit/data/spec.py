"""``from_spec``: the dataset strings of the CLI and the training configs."""

from __future__ import annotations

from lesionkit.data.isic import SPLITS

SPEC_FORMS = ("isic:PATH[:split]", "ph2:PATH", "folder:PATH[:split]", "nifti:PATH", "synthetic:N[:seed]")


def _path_and_split(rest: str) -> tuple[str, str | None]:
    head, sep, tail = rest.rpartition(":")
    if sep and tail in SPLITS and head:
        return head, tail
    return rest, None


def from_spec(spec: str, image_size=None, transform=None):
    """A dataset from a spec string, one of SPEC_FORMS, e.g. "isic:data/isic2018:val" or
    "synthetic:1000:3". image_size None keeps native resolution (synthetic: 256)."""
    from lesionkit.data.folder import FolderDataset
    from lesionkit.data.isic import ISICDataset
    from lesionkit.data.nifti import NiftiSliceDataset
    from lesionkit.data.ph2 import PH2Dataset
    from lesionkit.data.synthetic import SyntheticLesions

    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"data spec should look like one of {list(SPEC_FORMS)}, got {spec!r}")
    kind, rest = spec.split(":", 1)
    kind = kind.lower()
    if not rest:
        raise ValueError(f"data spec {spec!r} has nothing after '{kind}:'; forms: {list(SPEC_FORMS)}")
    if kind == "synthetic":
        n, _, seed = rest.partition(":")
        try:
            n_i, seed_i = int(n), int(seed or 0)
        except ValueError:
            raise ValueError(f"data spec {spec!r}: expected synthetic:N[:seed] with integers") from None
        return SyntheticLesions(n_i, 256 if image_size is None else image_size, seed_i, transform=transform)
    if kind == "isic":
        path, split = _path_and_split(rest)
        return ISICDataset(path, split=split, image_size=image_size, transform=transform)
    if kind == "folder":
        path, split = _path_and_split(rest)
        return FolderDataset(path, split=split, image_size=image_size, transform=transform)
    if kind == "ph2":
        return PH2Dataset(rest, image_size=image_size, transform=transform)
    if kind == "nifti":
        return NiftiSliceDataset(rest, image_size=image_size, transform=transform)
    raise ValueError(f"data spec {spec!r}: unknown kind {kind!r}; forms: {list(SPEC_FORMS)}")
