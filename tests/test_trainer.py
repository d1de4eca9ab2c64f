"""Trainer in-process: outputs, exact resume, stage hooks, budgets, early stopping, schedules."""

import csv
import math

import pytest
import torch

from lesionkit.engine import Stage, Trainer, TrainConfig, load_checkpoint
from lesionkit.engine.schedulers import WarmupCosineLR, WarmupPolyLR
from lesionkit.data.splits import holdout_split


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny shapes: one thread is fastest and immune to other jobs on a shared 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Discs(torch.utils.data.Dataset):
    """Bright discs on a darker noisy background: learnable in a few steps."""

    def __init__(self, n: int, size: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        centre = torch.randint(8, size - 8, (n, 2), generator=g)
        radius = torch.randint(4, 9, (n,), generator=g)
        d2 = (yy[None] - centre[:, 0, None, None]) ** 2 + (xx[None] - centre[:, 1, None, None]) ** 2
        self.masks = (d2 <= radius[:, None, None] ** 2).float()[:, None]
        noise = 0.1 * torch.rand(n, 3, size, size, generator=g)
        self.images = (0.3 + 0.5 * self.masks + noise).clamp(0, 1)

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "mask": self.masks[i], "id": f"disc{i:03d}", "orig_size": (32, 32)}


def make_config(tmp_path, **over) -> TrainConfig:
    sets = {"model.kwargs.widths": "[4, 8, 16]", "data.batch_size": 4, "epochs": 3, "optim.lr": 0.01,
            "progress": "false", "out_dir": str(tmp_path), "data.num_workers": 0}
    sets.update(over)
    return TrainConfig().with_overrides([f"{k}={v}" for k, v in sets.items()])


def fit(cfg, trainer_cls=Trainer, resume=None, **kw):
    trainer = trainer_cls(cfg, train_data=Discs(16), val_data=Discs(6, seed=1), **kw)
    if resume is not None:
        trainer.resume(resume)
    return trainer, trainer.fit()


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_fit_writes_outputs_and_learns(tmp_path):
    trainer, summary = fit(make_config(tmp_path, epochs=4))
    assert {"best.pt", "last.pt", "log.csv", "config.yaml", "curves.png"} <= {p.name for p in tmp_path.iterdir()}
    rows = read_log(tmp_path / "log.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert summary["stop_reason"] == "epochs" and summary["global_step"] == 4 * 4
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == summary["best_epoch"]
    assert best["metrics"]["dataset"]["dice"] == pytest.approx(summary["best_metric"])
    assert "optimizer" not in best  # best.pt holds weights for inference only
    last = load_checkpoint(tmp_path / "last.pt")
    assert {"optimizer", "scheduler", "scaler", "rng", "epoch", "global_step", "config", "lesionkit_version"} <= last.keys()
    assert TrainConfig.from_dict(last["config"]) == trainer.cfg


class CrashAfter(Trainer):
    """Dies after training epoch `crash_epoch`, before it is checkpointed (like a kill)."""

    crash_epoch = 3

    def on_epoch_end(self, epoch, logs):
        if epoch == self.crash_epoch:
            raise KeyboardInterrupt


def test_resume_reaches_the_uninterrupted_weights(tmp_path):
    cfg = make_config(tmp_path / "a", epochs=4, **{"model.kwargs.dropout": 0.2})
    full, _ = fit(cfg)
    cfg_b = make_config(tmp_path / "b", epochs=4, **{"model.kwargs.dropout": 0.2})
    with pytest.raises(KeyboardInterrupt):
        fit(cfg_b, CrashAfter)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 2
    resumed, summary = fit(cfg_b, resume=tmp_path / "b" / "last.pt")
    assert summary["epochs"] == 4 and summary["global_step"] == 16
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [int(r["epoch"]) for r in read_log(tmp_path / "b" / "log.csv")] == [1, 2, 3, 4]


class TwoStage(Trainer):
    """A recipe in the shape of SegMAE: a warm-up stage, then a stage with an extra, alternating loss."""

    def __init__(self, *args, **kwargs):
        self.events = []
        super().__init__(*args, **kwargs)

    def stages(self):
        return [Stage("warmup", 1), Stage("main", 2)]

    def on_stage_start(self, stage):
        self.events.append(stage.name)
        if stage.name == "main":  # a new optimiser and schedule for the second stage
            self.optimizer, self.scheduler = self.configure_optimizers()

    def training_step(self, batch):
        out = super().training_step(batch)
        if self.stage.name == "main" and self.global_step % 2 == 1:
            out["aux"] = self.forward(batch["image"]).abs().mean() * 0.01
            out["loss"] = out["loss"] + out["aux"]
        return out


def test_stage_hooks_extra_losses_and_resume_inside_a_stage(tmp_path):
    trainer, summary = fit(make_config(tmp_path / "a"), TwoStage)
    assert trainer.events == ["warmup", "main"]
    rows = read_log(tmp_path / "a" / "log.csv")
    assert [r["stage"] for r in rows] == ["warmup", "main", "main"]
    assert rows[0]["train_aux"] == "" and float(rows[1]["train_aux"]) > 0

    class Crash(TwoStage):
        def on_epoch_end(self, epoch, logs):
            if epoch == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(make_config(tmp_path / "b"), Crash)
    resumed, _ = fit(make_config(tmp_path / "b"), TwoStage, resume=tmp_path / "b" / "last.pt")
    assert resumed.events == ["main"]
    for (name, a), b in zip(trainer.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_time_budget_stops_mid_epoch(tmp_path):
    _, summary = fit(make_config(tmp_path, epochs=50, time_budget=1e-3))
    assert summary["stop_reason"] == "time_budget"
    assert summary["epochs"] == 1 and summary["global_step"] == 1
    assert (tmp_path / "last.pt").exists() and (tmp_path / "best.pt").exists()


def test_early_stopping(tmp_path):
    # lr 0: validation Dice never improves after the first epoch.
    _, summary = fit(make_config(tmp_path, epochs=10, early_stopping_patience=2, **{"optim.lr": 0.0}))
    assert summary["stop_reason"] == "early_stopping"
    assert summary["epochs"] == 3 and summary["best_epoch"] == 1


def test_plateau_scheduler_and_sgd(tmp_path):
    # lr 1e-6 moves the weights too little to change the validation Dice by the scheduler's
    # relative threshold (1e-4), so every epoch after the first is "bad"; with patience 0 each one
    # halves the learning rate for the next epoch (an lr of 0 would hide whether the scheduler acted at all, and cuts
    # below the scheduler's eps of 1e-8 are skipped).
    cfg = make_config(tmp_path, epochs=3, **{"scheduler.name": "plateau", "scheduler.patience": 0,
                                             "scheduler.factor": 0.5, "optim.name": "sgd", "optim.lr": 1e-6,
                                             "scheduler.min_lr": 0.0})
    trainer, _ = fit(cfg)
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert [float(r["lr"]) for r in read_log(tmp_path / "log.csv")] == pytest.approx([1e-6, 1e-6, 5e-7])
    state = load_checkpoint(tmp_path / "last.pt")["scheduler"]
    assert state["_last_lr"] == pytest.approx([2.5e-7]) and state["num_bad_epochs"] == 0  # reset by each cut


def test_bf16_autocast_on_cpu_and_grad_clip(tmp_path, monkeypatch):
    clip = 1e-3  # far below the gradient norm of an untrained model
    trainer = Trainer(make_config(tmp_path, epochs=1, precision="bf16", grad_clip=clip),
                      train_data=Discs(16), val_data=Discs(6, seed=1))
    dtypes, before, after = set(), [], []
    conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda mod, inp, out: dtypes.add(out.dtype) if mod.training else None)
    clip_grad_norm = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: before.append(float(clip_grad_norm(*a, **k))))

    def record_grad_norm(optimizer, args, kwargs):  # what the optimizer is about to apply
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        after.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))))

    trainer.optimizer.register_step_pre_hook(record_grad_norm)
    summary = trainer.fit()
    assert dtypes == {torch.bfloat16}  # the training forward ran under bf16 autocast
    assert len(before) == len(after) == summary["global_step"] > 0
    assert min(before) > 10 * clip  # clipping had work to do
    assert after == pytest.approx([clip] * len(after), rel=1e-3)  # and the optimizer saw clipped gradients
    assert math.isfinite(summary["last_metrics"]["dataset"]["dice"])


@pytest.mark.parametrize("native", [False, True])
def test_precision_auto_takes_bf16_only_where_the_cpu_has_it(tmp_path, monkeypatch, capsys, native):
    """precision: auto (the shipped recipes) trains in bf16 on a CPU with AVX-512 BF16 / AMX and
    in fp32 elsewhere, where CPU bf16 is emulated and several times slower (docs/engine.md);
    explicit bf16 on such a CPU still runs bf16, with a warning."""
    from lesionkit.engine.evaluation import resolve_precision

    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: native)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="precision should be one of"):
        resolve_precision("bf32", cpu)
    trainer = Trainer(make_config(tmp_path, epochs=1, precision="auto"), train_data=Discs(8), val_data=Discs(4, seed=1))
    assert f"precision auto -> {'bf16' if native else 'fp32'}" in capsys.readouterr().out
    dtypes = set()
    conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda mod, inp, out: dtypes.add(out.dtype))
    trainer.fit()
    assert dtypes == {torch.bfloat16 if native else torch.float32}  # training and validation
    assert trainer.cfg.precision == "auto"  # resolved again where a resumed run runs
    if not native:
        with pytest.warns(RuntimeWarning, match="no native bf16"):
            Trainer(make_config(tmp_path / "b", epochs=1, precision="bf16"), train_data=Discs(8), val_data=Discs(4))


def test_fp16_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 is valid with CUDA")
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        fit(make_config(tmp_path, precision="fp16"))


def test_non_finite_loss_is_an_error(tmp_path):
    with pytest.raises(FloatingPointError, match="training loss is nan"):
        fit(make_config(tmp_path), loss_fn=lambda logits, mask: logits.mean() * float("nan"))


def test_unknown_monitor_lists_metrics(tmp_path):
    with pytest.raises(ValueError, match="monitor 'dcie'.*'dice'"):
        fit(make_config(tmp_path, monitor="dcie"))


def test_resume_refuses_another_model_and_weights_only_files(tmp_path):
    fit(make_config(tmp_path / "a", epochs=1))
    other = make_config(tmp_path / "b", **{"model.name": "unet"})
    trainer = Trainer(other, train_data=Discs(8), val_data=Discs(2))
    with pytest.raises(ValueError, match="holds model 'unet_tiny', but this run trains 'unet'"):
        trainer.resume(tmp_path / "a" / "last.pt")
    with pytest.raises(ValueError, match="weights only"):
        trainer.resume(tmp_path / "a" / "best.pt")


def test_holdout_split_is_seeded_and_disjoint():
    data = Discs(20)
    a_train, a_val = holdout_split(data, 0.25, seed=3)
    b_train, b_val = holdout_split(data, 0.25, seed=3)
    assert a_val.indices == b_val.indices and len(a_val) == 5
    assert set(a_train.indices).isdisjoint(a_val.indices) and len(a_train) + len(a_val) == 20
    assert holdout_split(data, 0.25, seed=4)[1].indices != a_val.indices
    with pytest.raises(ValueError, match="hold out"):
        holdout_split(Discs(1), 0.5, seed=0)


def test_warmup_cosine_and_poly_shapes():
    def lrs(cls, **kw):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sched = cls(opt, total_steps=10, warmup_steps=2, **kw)
        out = []
        for _ in range(10):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out + [opt.param_groups[0]["lr"]]

    cos = lrs(WarmupCosineLR, min_lr=0.1)
    # warm-up rises linearly from min_lr towards the base lr
    assert cos[0] == pytest.approx(0.1 + 0.9 / 3) and cos[1] == pytest.approx(0.1 + 0.9 * 2 / 3) and cos[2] == pytest.approx(1.0)
    assert cos[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(cos[2:], cos[3:]))
    assert cos[6] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    poly = lrs(WarmupPolyLR, power=1.0)
    assert poly[6] == pytest.approx(0.5) and poly[-1] == pytest.approx(0.0)


def test_periodic_cosine_follows_torch_cosine_annealing():
    # scheduler.t_max_epochs reproduces CosineAnnealingLR(T_max, eta_min) stepped once an epoch
    # (VM-UNet / CM-SSM: T_max 50 over 300 epochs): down, back up, down again.
    from lesionkit.engine.config import SchedulerConfig
    from lesionkit.engine.schedulers import build_scheduler

    def run(make, epochs=12, steps_per_epoch=3):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sched = make(opt)
        out = []
        for _ in range(epochs):
            out.append(opt.param_groups[0]["lr"])
            for _ in range(steps_per_epoch if isinstance(sched, WarmupCosineLR) else 1):
                opt.step()
                sched.step()
        return out

    cfg = SchedulerConfig(name="cosine", min_lr=0.01, t_max_epochs=4)
    ours = run(lambda opt: build_scheduler(cfg, opt, epochs=12, steps_per_epoch=3))
    want = run(lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=0.01))
    assert ours == pytest.approx(want, abs=1e-9)
    assert ours[4] == pytest.approx(0.01) and ours[8] == pytest.approx(1.0)  # bottom, then top again
    with pytest.raises(ValueError, match="t_max_epochs"):
        build_scheduler(SchedulerConfig(name="poly", t_max_epochs=4), torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 12, 3)


def test_recipe_config_class_is_picked_by_the_trainer_key(tmp_path):
    from dataclasses import dataclass, field

    from lesionkit.engine import load_train_config, register_trainer

    @dataclass
    class RecipeSection:
        weight: float = 0.5

    @dataclass
    class RecipeConfig(TrainConfig):
        recipe: RecipeSection = field(default_factory=RecipeSection)

    @register_trainer("test_recipe")
    class RecipeTrainer(Trainer):
        config_class = RecipeConfig

    path = tmp_path / "r.yaml"
    path.write_text("trainer: test_recipe\nrecipe:\n  weight: 0.25\n")
    cfg = load_train_config(path)
    assert isinstance(cfg, RecipeConfig) and cfg.recipe.weight == 0.25
    assert load_train_config(cfg.to_dict()) == cfg  # what --resume reads back from a checkpoint
    assert cfg.with_overrides(["recipe.weight=2"]).recipe.weight == 2.0
    path.write_text("recipe:\n  weight: 0.25\n")  # the default trainer has no such section
    with pytest.raises(ValueError, match=r"r.yaml.*unknown config key\(s\) \['recipe'\]"):
        load_train_config(path)
    with pytest.raises(ValueError, match="unknown trainer 'nope'.*segmentation"):
        load_train_config({"trainer": "nope"})


def test_paired_transforms_reach_training_data_only(tmp_path):
    cfg = make_config(tmp_path, epochs=1, **{"data.train": "synthetic:10:0", "data.image_size": 32,
                                             "data.transforms": "{rotation: 30, brightness: 0.2}"})
    trainer = Trainer(cfg)
    train, val = trainer.train_data, trainer.val_data
    assert train.dataset.transform is not None and val.dataset.transform is None  # validation unaugmented
    assert len(train) == 9 and len(val) == 1 and set(train.indices).isdisjoint(val.indices)
    assert trainer.fit()["epochs"] == 1
    with pytest.raises(ValueError, match=r"data.transforms has unknown key\(s\) \['normalize'\]"):
        Trainer(make_config(tmp_path, **{"data.train": "synthetic:4", "data.transforms": "{normalize: 1}"}))


def test_time_horizon_decays_by_the_budget_fraction():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = WarmupCosineLR(opt, total_steps=1000, warmup_steps=0)
    sched.time_progress = 0.5
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)  # half the budget: half-way down the cosine
    sched.time_progress = 1.2
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="horizon 'time_budget' needs time_budget"):
        TrainConfig().with_overrides(["scheduler.horizon=time_budget"])


def test_monitor_loss_keeps_the_lowest_validation_loss_and_stops_on_it(tmp_path):
    from lesionkit.engine.evaluation import evaluate

    trainer, summary = fit(make_config(tmp_path, epochs=4, monitor="loss", early_stopping_patience=1))
    rows = read_log(tmp_path / "log.csv")
    losses = [float(r["val_loss"]) for r in rows]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert summary["best_epoch"] == int(rows[best]["epoch"]) and trainer.best_metric == pytest.approx(losses[best], rel=1e-4)
    # Stopped after the first epoch without a lower loss, or ran out of epochs still improving.
    worse = [k for k in range(1, len(losses)) if losses[k] >= min(losses[:k])]
    assert len(rows) == (worse[0] + 1 if worse else 4)
    # The logged value is the training loss over the validation images.
    val = torch.utils.data.DataLoader(Discs(6, seed=1), batch_size=4)
    trainer.model.load_state_dict(torch.load(tmp_path / "last.pt", weights_only=True)["model"])
    trainer.model.eval()
    with torch.no_grad():
        want = sum(float(trainer.loss_fn(trainer.model(b["image"]), b["mask"])) * len(b["image"]) for b in val) / 6
    got = evaluate(trainer.model, val, torch.device("cpu"), loss_fn=trainer.loss_fn).metrics["loss"]
    assert got == pytest.approx(want, rel=1e-5) and float(rows[-1]["val_loss"]) == pytest.approx(want, rel=1e-4)


def test_paper_warmup_rises_tenfold_and_a_time_budget_caps_the_warmup():
    from lesionkit.engine.config import SchedulerConfig
    from lesionkit.engine.schedulers import build_scheduler

    def sgd():
        return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)

    # GRCSF Sec. 4: base / 10 -> base over the warm-up (warmup_start 0.1), then the cosine.
    opt = sgd()
    sched = build_scheduler(SchedulerConfig(warmup_epochs=1, warmup_start=0.1), opt, epochs=10, steps_per_epoch=4)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1 + 0.9 * k / 5 for k in range(1, 5)] + [1.0])
    # Under a time budget the warm-up ends at 5 % of the budget even with steps left in it, and
    # the cosine then runs from the full rate over the rest of the budget.
    opt = sgd()
    cfg = SchedulerConfig(warmup_epochs=100, horizon="time_budget")
    sched = build_scheduler(cfg, opt, epochs=10, steps_per_epoch=4)
    for progress in (0.01, 0.03):
        sched.time_progress = progress
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] < 0.01  # still warming up (step 2 of 400)
    sched.time_progress = 0.05
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
    sched.time_progress = 0.05 + 0.95 / 2
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)  # half the rest: half-way down
    state = sched.state_dict()  # resume keeps where the warm-up ended
    assert state["warmup_steps"] == 3 and state["warmup_end_progress"] == pytest.approx(0.05)
    for field, value in [("warmup_start", 1.5), ("warmup_max_fraction", 0.0)]:
        with pytest.raises(ValueError, match=f"scheduler.{field}"):
            build_scheduler(SchedulerConfig(**{field: value}), sgd(), 10, 4)


def test_tensorboard_without_the_package_says_how_to_get_it(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        _, _ = fit(make_config(tmp_path, epochs=1, tensorboard="true"))
        assert any((tmp_path / "tensorboard").iterdir())
    else:
        with pytest.raises(ValueError, match=r"tensorboard.*lesionkit\[tensorboard\]"):
            fit(make_config(tmp_path, epochs=1, tensorboard="true"))
