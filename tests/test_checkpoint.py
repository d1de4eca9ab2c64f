"""Checkpoints: atomic replacement, weights_only loading, RNG round trip, model mismatch errors."""

import random

import numpy as np
import pytest
import torch

from lesionkit.engine import checkpoint as ckpt
from lesionkit.models import create_model


def _state(model):
    header = ckpt.checkpoint_header("unet_tiny", {"widths": [4, 8]}, {"seed": 0, "data": {"image_size": 16}})
    return {**header, "model": model.state_dict(), "rng": [ckpt.capture_rng_state()]}


def test_save_load_round_trip_with_weights_only(tmp_path):
    model = create_model("unet_tiny", widths=[4, 8])
    path = tmp_path / "a.pt"
    ckpt.save_checkpoint(_state(model), path)
    # load_checkpoint uses weights_only=True; loading directly must work as well.
    raw = torch.load(path, weights_only=True)
    state = ckpt.load_checkpoint(path)
    assert raw.keys() == state.keys()
    assert state["lesionkit_version"]
    rebuilt = ckpt.model_from_checkpoint(state, path)
    for (k, a), b in zip(model.state_dict().items(), rebuilt.state_dict().values()):
        assert torch.equal(a, b), k
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temp files left


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = create_model("unet_tiny", widths=[4, 8])
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint(_state(model), path)
    before = path.read_bytes()

    def torn_save(obj, f):  # a kill in the middle of writing: some bytes, then death
        f.write(b"\x80\x02partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(_state(model), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_rng_state_round_trip_through_a_file(tmp_path):
    state = ckpt.capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    ckpt.save_checkpoint({"model": {}, "model_name": "x", "rng": state}, tmp_path / "r.pt")
    random.random(), np.random.rand(), torch.rand(3)  # move every stream on
    ckpt.restore_rng_state(ckpt.load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        ckpt.load_checkpoint(tmp_path / "nothing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        ckpt.load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt.*not a lesionkit checkpoint"):
        ckpt.load_checkpoint(tmp_path / "other.pt")


def test_checkpoint_of_another_model_says_so(tmp_path):
    model = create_model("unet_tiny", widths=[4, 8])
    ckpt.save_checkpoint(_state(model), tmp_path / "a.pt")
    state = ckpt.load_checkpoint(tmp_path / "a.pt")
    with pytest.raises(ValueError, match="holds model 'unet_tiny', not 'unet'"):
        ckpt.model_from_checkpoint(state, tmp_path / "a.pt", expected_model="unet")
    state["model_kwargs"] = {"widths": [4, 16]}
    with pytest.raises(ValueError, match="does not fit model 'unet_tiny'"):
        ckpt.model_from_checkpoint(state, tmp_path / "a.pt")
