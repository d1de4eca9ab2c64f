"""``lesionkit train | pretrain | evaluate | predict | residual-maps | demo | configs | data synth | info``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def _train_overrides(args: argparse.Namespace) -> list[str]:
    """Config overrides from the flags ``train`` and ``pretrain`` were given (pretrain has no
    --model / --val-data nor the fine-tuning flags)."""
    flags = {
        "model.name": "model", "data.train": "data", "data.val": "val_data", "data.image_size": "image_size",
        "epochs": "epochs", "time_budget": "time_budget", "data.batch_size": "batch_size", "out_dir": "out",
        "device": "device", "precision": "precision", "seed": "seed",
        # Fine-tuning from a pre-trained checkpoint (train only).
        "init_from": "init_from", "init_parts": "init_parts", "data.label_fraction": "label_fraction",
    }
    pairs = {key: getattr(args, flag, None) for key, flag in flags.items()}
    out = [f"{k}={v}" for k, v in pairs.items() if v is not None]
    if args.no_progress:
        out.append("progress=false")
    return out + list(args.set or [])


def _config_and_resume(args: argparse.Namespace):
    """``(config or None, checkpoint to resume or None)`` from ``--config`` and ``--resume [CKPT]``.

    ``--resume`` without a path continues from OUT/last.pt, OUT being ``--out``, else the
    config's ``out_dir``; with neither, the checkpoint's config is the run's config.
    """
    from lesionkit.engine import load_checkpoint, load_train_config

    cfg = load_train_config(args.config) if args.config is not None else None
    if not args.resume:
        return cfg, None
    if isinstance(args.resume, str):
        path = Path(args.resume)
    elif args.out or cfg is not None:
        path = Path(args.out or cfg.out_dir) / "last.pt"
    else:
        raise ValueError(f"--resume without a checkpoint needs --out DIR or --config (to find DIR/last.pt); "
                         f"or give the checkpoint: lesionkit {args.command} --resume DIR/last.pt")
    if not path.is_file():
        raise FileNotFoundError(f"--resume: checkpoint {str(path)!r} does not exist")
    if cfg is None:
        cfg = load_train_config(load_checkpoint(path)["config"])
    return cfg, path


def _fit(cfg, resume_path: Path | None, command: str, done: Callable[[dict], str]) -> int:
    """Build the recipe's trainer, resume if asked, train; print ``done(summary)`` or how to resume.

    Returns 0, or 128 + the signal number when SIGINT / SIGTERM stopped the run (last.pt holds it).
    """
    from lesionkit.engine import build_trainer

    trainer = build_trainer(cfg)
    if resume_path is not None:
        trainer.resume(resume_path)
    summary = trainer.fit()
    stop = summary["stop_reason"]
    interrupted = stop.startswith("SIG")
    if trainer.dist.is_main:
        print(done(summary), flush=True)
        if interrupted:
            print(f"stopped by {stop} at step {summary['global_step']}; {cfg.out_dir}/last.pt holds the state. "
                  f"Resume with: lesionkit {command} --resume {cfg.out_dir}/last.pt", file=sys.stderr, flush=True)
    trainer.dist.shutdown()
    if interrupted:
        import signal

        return 128 + int(getattr(signal, stop))
    return 0


def _speed(summary: dict) -> str:
    ips = summary["train_images_per_s"]
    return f"; {ips:.1f} training images/s" if ips else ""


def cmd_train(args: argparse.Namespace) -> int:
    from lesionkit.engine import TrainConfig

    if args.model is not None and args.config is not None:
        raise ValueError("give --model or --config, not both (set the model inside the config file)")
    cfg, resume_path = _config_and_resume(args)
    if cfg is None:
        cfg = TrainConfig()
        if args.model is None:
            raise ValueError("give --model NAME or --config FILE (lesionkit.list_models() lists the models)")
    cfg = cfg.with_overrides(_train_overrides(args))
    from lesionkit.models import is_model, list_models

    if not is_model(cfg.model.name):
        raise ValueError(f"unknown model {cfg.model.name!r}; registered models: {', '.join(list_models())}")

    def done(summary: dict) -> str:
        best = summary["best_metric"]
        return (f"trained {summary['epochs']} epochs ({summary['stop_reason']}) in {summary['elapsed_s']:.1f} s"
                f"{_speed(summary)}; best val {cfg.monitor} = {best if best is None else f'{best:.4f}'} "
                f"at epoch {summary['best_epoch']}; wrote {cfg.out_dir}/best.pt, last.pt, log.csv, config.yaml")

    return _fit(cfg, resume_path, "train", done)


def cmd_pretrain(args: argparse.Namespace) -> int:
    """``lesionkit pretrain``: self-supervised pre-training, the recipes whose trainer sets ``pretraining``
    (AMLP; GRCSF's MAE)."""
    from lesionkit.engine.registry import get_trainer_class, trainer_names

    cfg, resume_path = _config_and_resume(args)
    if cfg is None:
        raise ValueError("give --config NAME (e.g. amlp_pretrain_tiny_isic2018; lesionkit configs lists them) or --resume")
    if not get_trainer_class(cfg.trainer).pretraining:
        names = [n for n in trainer_names() if get_trainer_class(n).pretraining]
        raise ValueError(f"--config {args.config!r} is a {cfg.trainer!r} recipe; pretrain runs pre-training recipes "
                         f"(trainer: {' | '.join(names)}), e.g. amlp_pretrain_tiny_isic2018; train it with lesionkit train")
    cfg = cfg.with_overrides(_train_overrides(args))

    def done(summary: dict) -> str:
        return (f"pre-trained {summary['epochs']} epochs ({summary['stop_reason']}) in {summary['elapsed_s']:.1f} s"
                f"{_speed(summary)}; wrote {cfg.out_dir}/best.pt, last.pt, log.csv, config.yaml. "
                f"{get_trainer_class(cfg.trainer).pretraining.format(out=cfg.out_dir)}")

    return _fit(cfg, resume_path, "pretrain", done)


def _load_model(checkpoint: str, device_name: str):
    from lesionkit.engine import load_checkpoint, model_from_checkpoint
    from lesionkit.engine.runtime import resolve_device

    device = resolve_device(device_name)
    state = load_checkpoint(checkpoint, map_location=device)
    model = model_from_checkpoint(state, checkpoint).to(device).eval()
    config = state.get("config", {})
    image_size = int(config.get("data", {}).get("image_size", 256))
    threshold = float(config.get("threshold", 0.5))
    return model, device, image_size, threshold, config.get("data", {})


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from lesionkit.engine.builders import build_dataset, build_eval_transform
    from lesionkit.engine.evaluation import evaluate
    from lesionkit.engine.reporting import best_worst_grid, metrics_table, write_metrics_json

    model, device, image_size, threshold, data_cfg = _load_model(args.checkpoint, args.device)
    image_size = args.image_size or image_size
    dataset = build_dataset(args.data, image_size, build_eval_transform(data_cfg))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                                         pin_memory=device.type == "cuda")
    result = evaluate(model, loader, device, threshold, progress=not args.no_progress)
    print(metrics_table(result.metrics))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_metrics_json(result.metrics, out / "metrics.json")
    best_worst_grid(model, dataset, result, out / "overlays.png", device, threshold=threshold)
    print(f"wrote {out / 'metrics.json'} and {out / 'overlays.png'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from lesionkit.engine.builders import build_eval_transform
    from lesionkit.engine.prediction import expand_inputs, predict_files

    files = expand_inputs(args.inputs)
    model, device, image_size, threshold, data_cfg = _load_model(args.checkpoint, args.device)
    results = predict_files(model, files, Path(args.out), image_size, device,
                            threshold=args.threshold if args.threshold is not None else threshold,
                            transform=build_eval_transform(data_cfg))
    for r in results:
        print(f"{r.path} -> {r.mask_path} ({r.orig_size[1]}x{r.orig_size[0]}, lesion {r.foreground_fraction:.1%})")
    return 0


def cmd_residual_maps(args: argparse.Namespace) -> int:
    from lesionkit.engine.runtime import resolve_device
    from lesionkit.engine.trainers.residual_maps import ResidualMapSettings, summary_line, write_residual_maps

    settings = ResidualMapSettings(tuple(args.ratios), args.repeats, args.kind, args.seed, args.precision)
    run = write_residual_maps(args.checkpoint, args.data, args.out, settings, image_size=args.image_size,
                              device=resolve_device(args.device), png=args.png, progress=not args.no_progress,
                              num_workers=args.num_workers)
    print(summary_line(run))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lesionkit.engine.demo import run_demo

    if args.minutes is not None and args.time_budget is not None:
        raise ValueError("give --minutes or --time-budget (seconds), not both")
    minutes = args.time_budget / 60.0 if args.time_budget is not None else args.minutes
    overrides = list(args.set or [])
    if args.epochs is not None:
        overrides.append(f"epochs={args.epochs}")
    if args.device is not None:
        overrides.append(f"device={args.device}")
    kwargs = {"test_spec": args.test_data} if args.test_data else {}
    if args.threads is not None:
        kwargs["threads"] = args.threads
    result = run_demo(args.out, overrides, progress=not args.no_progress, minutes=minutes, **kwargs)
    dice = result["metrics"]["dataset"]["dice"]
    summary = result["summary"]
    slow = " (a slow run: see the report)" if result["slow"] else ""
    print(f"demo: held-out Dice {dice:.4f} after {summary['global_step']} steps ({summary['epochs']} epochs), "
          f"{result['wall_s']:.0f} s in all{slow}; report in {Path(args.out) / 'report.md'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lesionkit.engine.export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.format, args.out, image_size=args.image_size,
                               scan_chunk=args.scan_chunk, optimize="none" if args.no_optimize else args.optimize)
    print(f"wrote {result.path} ({result.format}, input {'x'.join(map(str, result.input_shape))}); "
          f"reproduces the checkpoint's logits to {result.max_abs_diff:.2g} (max |difference|)")
    if result.format == "onnx":
        d = result.details
        print(f"onnx: opset {d['opset']}, {d['size_bytes'] / 2**20:.1f} MiB, batch dynamic, image size fixed at "
              f"{result.input_shape[-2]}x{result.input_shape[-1]}, scan chunk {d['scan_chunk']}, "
              f"graph optimize {d['optimize']}; ONNX Runtime "
              f"{d['onnxruntime']} (CPU) reproduces PyTorch at batch {' and '.join(map(str, d['batches_checked']))}: "
              f"logits to {max(result.max_abs_diff, d['max_abs_diff_batch_2']):.2g}, probabilities to "
              f"{d['probabilities_max_abs_diff']:.2g} (max |difference|)")
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    from lesionkit.configs import RECIPES_DIR, list_recipes, recipe_summary

    names = list_recipes()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {recipe_summary(name)}")
    print(f"\n{len(names)} recipes in {RECIPES_DIR}; train one with: lesionkit train --config NAME")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from lesionkit.data import synth_cli

    return synth_cli(args.rest or ["--help"])


def cmd_info(args: argparse.Namespace) -> int:
    import importlib.util
    import os
    import platform

    import numpy
    import torch

    import lesionkit
    from lesionkit.layers.linear import describe_fp32_matmul_backend
    from lesionkit.models import list_models

    lines = [
        f"lesionkit   {lesionkit.__version__}",
        f"python      {platform.python_version()} ({platform.platform()})",
        f"torch       {torch.__version__} (CUDA build {torch.version.cuda})",
        f"numpy       {numpy.__version__}",
    ]
    for name in ("torchvision", "timm"):
        spec = importlib.util.find_spec(name)
        version = "not installed"
        if spec is not None:
            version = __import__(name).__version__
        lines.append(f"{name:<11} {version}")
    lines.append(f"cpu         {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    lines.append(f"fp32 matmul {describe_fp32_matmul_backend()}: the CPU's float32 linears / bmm (docs/ops.md)")
    if torch.cuda.is_available():
        gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"device      cuda ({gpus})")
    else:
        lines.append("device      cpu (no CUDA device)")
    lines.append(f"models      {', '.join(list_models())}")
    print("\n".join(lines))
    print()
    if importlib.util.find_spec("lesionkit.kernels") is None:
        print("kernels     the lesionkit.kernels package is missing from this installation: no backends to report")
    else:
        import lesionkit.kernels as K

        print("kernel backends per op:")
        print(K.format_info())
    return 0


def _add_run_arguments(p: argparse.ArgumentParser, out_default: str, set_example: str) -> None:
    """The options ``train`` and ``pretrain`` share: budgets, output, resume, device, overrides."""
    p.add_argument("--image-size", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--time-budget", type=float, metavar="SECONDS")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--out", help=f"output folder (default: {out_default})")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                   help="continue from OUT/last.pt (or the checkpoint given)")
    p.add_argument("--device")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16", "auto"])
    p.add_argument("--seed", type=int)
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", help=f"config overrides, e.g. {set_example}")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lesionkit", description="Lesion segmentation: train, evaluate, predict.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,pretrain,evaluate,predict,residual-maps,demo,export,configs,data,info}")

    p = sub.add_parser("train", help="train a model on a dataset")
    p.add_argument("--model", help="registered model name (lesionkit info lists them)")
    p.add_argument("--config", help="a shipped recipe's name (lesionkit configs lists them) or a YAML file")
    p.add_argument("--data", help="training data spec: isic:PATH[:split] | ph2:PATH | folder:PATH[:split] | nifti:PATH | synthetic:N[:seed]")
    p.add_argument("--val-data", help="validation data spec; default: a seeded hold-out of --data")
    _add_run_arguments(p, out_default="the config's out_dir; runs/train without --config", set_example="optim.lr=0.01")
    p.add_argument("--init-from", metavar="CKPT", help="start from the matching weights of a checkpoint (e.g. pretrain's best.pt)")
    p.add_argument("--init-parts", choices=["encoder", "encoder+decoder", "all"],
                   help="which parts --init-from loads (default: the config's init_parts, encoder)")
    p.add_argument("--label-fraction", type=float, metavar="F",
                   help="train on a seeded fraction (0, 1] of the labelled training images, e.g. 0.05")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain", help="self-supervised pre-training on images (AMLP); masks are not used")
    p.add_argument("--config", help="a pre-training recipe's name (e.g. amlp_pretrain_tiny_isic2018) or a YAML file")
    p.add_argument("--data", help="images: isic:PATH[:split] | folder:PATH[:split] (masks optional) | ph2:PATH | synthetic:N[:seed]")
    _add_run_arguments(p, out_default="the recipe's out_dir", set_example="amlp.strategy=random")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("evaluate", help="metrics of a checkpoint on a dataset")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="runs/evaluate")
    p.add_argument("--image-size", type=int, help="default: the size the checkpoint was trained at")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="masks for new images, at their original resolution")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("inputs", nargs="+", help="image files or folders of images")
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=float)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("residual-maps", help="GRCSF's MAE residual maps of a dataset, cached (only changed images are computed)")
    p.add_argument("--checkpoint", required=True, help="a trained MAE (trainer: mae), e.g. runs/grcsf_mae_tiny_isic2018/best.pt")
    p.add_argument("--data", required=True, help="data spec of the images, as for train")
    p.add_argument("--out", required=True, help="cache folder (grcsf.residual_maps of the GRCSF recipe)")
    p.add_argument("--image-size", type=int, help="default: the size the MAE was trained at; use the GRCSF recipe's")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75], metavar="R", help="mask ratios, one map each")
    p.add_argument("--repeats", type=int, default=5, help="reconstructions averaged per ratio")
    p.add_argument("--kind", choices=["absdiff", "mse", "ssim"], default="absdiff", help="residual of image and mean reconstruction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="the MAE's forward: bf16 is about 2x faster on CPUs with AVX-512 BF16, maps within ~0.01")
    p.add_argument("--png", action="store_true", help="also write each map as a 16-bit PNG")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_residual_maps)

    p = sub.add_parser("demo", help="train and evaluate on synthetic lesions (no download)")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--minutes", type=float, help="train against the clock for this long instead of the fixed "
                   "number of steps (the result then depends on the machine's speed and load)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS", help="--minutes, in seconds")
    p.add_argument("--epochs", type=int, help="epochs of 200 steps (default: the recipe's)")
    p.add_argument("--threads", type=int, help="torch threads (default 2 on any machine: another count rounds "
                   "differently, so the Dice may differ in the last digits)")
    p.add_argument("--test-data", help="held-out data spec (default: synthetic:200:2)")
    p.add_argument("--device")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="a checkpoint's model as ONNX, TorchScript or a torch.export program")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "exported-program"])
    p.add_argument("--out", help="output file (default: the checkpoint's name with .onnx / .ts / .pt2)")
    p.add_argument("--image-size", type=int, help="sample input size (default: the size the checkpoint was trained at)")
    p.add_argument("--scan-chunk", type=int, help="onnx: steps per chunk of the exported selective scan (default 16)")
    p.add_argument("--optimize", choices=["light", "full", "none"],
                   help="onnx: how the graph is tidied - light (default: constants folded, duplicates and unused "
                        "nodes removed), full (onnxscript's whole optimizer: 40-50 s more for an SS2D model, ONNX "
                        "Runtime 0-5%% faster), none (twice the file)")
    p.add_argument("--no-optimize", action="store_true", help="onnx: the same as --optimize none")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("configs", help="list the shipped recipes (names for train --config)")
    p.set_defaults(func=cmd_configs)

    # Parsed by lesionkit.data itself, so other commands do not import the data package.
    p = sub.add_parser("data", help="dataset tools: 'lesionkit data synth --out DIR --n N --layout isic2018|ph2|folder'",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("info", help="versions, device and kernel backends")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["data"]:  # everything after "data" belongs to lesionkit.data's own parser
        args = argparse.Namespace(command="data", rest=argv[1:], func=cmd_data)
    else:
        args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        # User errors (bad spec, unknown model, missing file): one line, no traceback.
        print(f"lesionkit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
