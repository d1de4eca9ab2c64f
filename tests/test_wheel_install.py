"""The package as a pip user gets it: a wheel installed outside the source tree ships its recipes,
and `lesionkit demo`, `lesionkit configs` and `lesionkit train --config NAME` run from it."""

import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

# Builds / subprocess runs: the slow stage (make test-slow). The tests share a module fixture, so
# xdist_group keeps them on one worker under that stage's --dist loadgroup.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("wheel_install")]

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", "runs",
                              "demo_out", ".pytest_cache", ".benchmarks", ".hypothesis", ".whl")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv holding only the wheel (built without the C++ library, for speed); torch and the
    other dependencies are this interpreter's, through a path file (no download)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    env = {**os.environ, "LESIONKIT_NO_EXTENSION": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
                    str(tmp / "dist"), str(src)], check=True, env=env, capture_output=True, timeout=600)
    (wheel,) = (tmp / "dist").glob("lesionkit-*.whl")
    target = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    py = target / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "outer_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    work = tmp / "work"  # outside the source tree: nothing but the installed package to import
    work.mkdir()
    return target / "bin", work


def run(installed, *args, timeout=300):
    bin_dir, work = installed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([str(bin_dir / "lesionkit"), *args], cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_wheel_is_what_runs_and_lists_its_recipes(installed):
    bin_dir, work = installed
    where = subprocess.run([str(bin_dir / "python"), "-c", "import lesionkit, lesionkit.configs as c; "
                            "print(lesionkit.__file__); print(c.RECIPES_DIR)"],
                           cwd=work, capture_output=True, text=True, check=True).stdout.split()
    assert not where[0].startswith(str(ROOT)) and "site-packages" in where[0]
    result = run(installed, "configs")
    assert result.returncode == 0, result.stderr
    assert "segmae_isic2018 " in result.stdout and "demo_unet_tiny_synthetic " in result.stdout


def test_demo_and_train_by_recipe_name_from_the_wheel(installed):
    _, work = installed
    demo = run(installed, "demo", "--out", "demo", "--time-budget", "3", "--test-data", "synthetic:8:2",
               "--no-progress", "--set", "data.train=synthetic:32:0", "data.val=synthetic:4:1", "data.image_size=32",
               "model.kwargs.widths=[4,8,16]")
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert (work / "demo" / "report.md").is_file() and (work / "demo" / "curves.png").is_file()
    train = run(installed, "train", "--config", "unet_tiny_isic2018", "--data", "synthetic:16:0", "--val-data",
                "synthetic:4:1", "--image-size", "32", "--epochs", "1", "--time-budget", "30", "--batch-size", "4",
                "--out", "run", "--set", "model.kwargs.widths=[4,8,16]", "data.num_workers=0")
    assert train.returncode == 0, train.stderr[-2000:]
    assert "trained 1 epochs" in train.stdout and (work / "run" / "last.pt").is_file()
