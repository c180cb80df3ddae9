"""`moedit train CONFIG [section.key=value ...]`: train a model and leave a run directory."""

from __future__ import annotations

import argparse
import sys

from moedit.errors import MoeditError



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*",
                        help="dotted overrides applied last, e.g. optim.lr=2e-4 (anywhere on the line)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def main(args: argparse.Namespace) -> int:
    from moedit.train.config import config_to_dict, load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    from moedit.train.threads import set_threads
    from moedit.train.trainer import Trainer

    threads = set_threads()  # before any torch work: a fair share of a shared machine
    # Checks of the data against the config, on every rank and before anything is written
    # (the run directory included): a mistyped data.path or shards of other shapes are one line.
    _check_builtin_target(cfg, args.overrides)
    check_model_fits_data(cfg)
    trainer = Trainer(cfg)
    failed = None
    try:
        if trainer.engine.is_main:
            _ensure_data(cfg)
        trainer.engine.barrier()
        check_model_fits_data(cfg)  # a built-in dataset prepared just now
        trainer.setup()
        if trainer.engine.is_main:
            e = trainer.engine
            print(threads, flush=True)
            print(
                f"moedit train: {cfg.flavor} on {e.device} engine={e.name} world_size={e.world_size} "
                f"micro_batch={trainer.micro_batch} accum={trainer.accum_steps} run_dir={cfg.train.run_dir}",
                flush=True,
            )
        code = trainer.fit()
        if code == 0 and trainer.engine.is_main:
            _print_outputs(cfg)
        return code
    except BaseException as exc:
        failed = exc
        raise
    finally:
        trainer.close()  # the run directory's lock, also after a failed setup
        if failed is not None and trainer.engine.world_size > 1:
            _exit_without_teardown(failed, trainer.engine)
        trainer.engine.shutdown()


def _exit_without_teardown(exc: BaseException, engine) -> None:
    """One rank of a multi-process run failed: report it and leave at once. Tearing the process group
    down can wait on the peers, which wait in their next collective for this rank (a 4-GPU run whose
    rank 0 raised in a checkpoint hung until the job's time limit instead of ending). Exiting lets
    the launcher (torchrun, srun) stop the others. Checkpoints are written atomically, so nothing
    saved is lost. A SystemExit keeps its code."""
    import os
    import traceback

    from moedit.errors import MoeditError

    if isinstance(exc, SystemExit):
        message = f"moedit train: exit {exc.code}\n"
    elif isinstance(exc, MoeditError):
        message = f"moedit train: error: {exc}\n"
    else:
        message = "".join(traceback.format_exception(exc))
    sys.stderr.write(f"[rank {engine.rank} of {engine.world_size}] {message}")
    sys.stderr.flush()
    sys.stdout.flush()
    if isinstance(exc, SystemExit):
        os._exit(exc.code if isinstance(exc.code, int) else 1)
    os._exit(130 if isinstance(exc, KeyboardInterrupt) else 2 if isinstance(exc, MoeditError) else 1)


def _override_keys(overrides) -> set[str]:
    return {text.split("=", 1)[0].strip() for text in overrides or [] if "=" in text}


def _check_builtin_target(cfg, overrides) -> None:
    """A config's built-in dataset (`data.prepare`) is prepared only at the config's own data.path:
    a data.path given on the command line names existing shards (a typo must not become a fresh
    copy of the digits), unless data.prepare is given on the command line too."""
    from pathlib import Path

    from moedit.data.manifest import manifest_path

    source = cfg.data.prepare
    keys = _override_keys(overrides)
    if not source or "data.path" not in keys or "data.prepare" in keys:
        return
    if Path(manifest_path(cfg.data)).is_file():
        return
    raise MoeditError(
        f"data.path = {cfg.data.path}: no prepared shards there (no {manifest_path(cfg.data)}). The config builds "
        f"its built-in '{source}' dataset only at its own data.path; a data.path given on the command line must "
        f"hold shards made by `moedit prepare`. Fix the path, or add data.prepare={source} to build '{source}' there")


def check_model_fits_data(cfg) -> None:
    """The model's input shape and classes must fit the shards' manifest: name the model.* keys to
    set (from dataset.json) before the trainer builds anything. Quiet when there is no manifest
    yet (the loader reports missing data in its own words)."""
    from pathlib import Path

    from moedit.data.manifest import load_manifest, manifest_path, model_changes_for

    path = manifest_path(cfg.data)
    if not Path(path).is_file():
        return
    manifest = load_manifest(path)
    m = cfg.model
    changes = model_changes_for(manifest, in_channels=m.in_channels, input_size=m.input_size,
                                num_classes=m.num_classes)
    if changes:
        c, h, w = manifest.latent_shape
        have = ", ".join(f"{key} = {getattr(m, key.split('.')[1])}" for key in changes)
        raise MoeditError(
            f"the shards at {cfg.data.path} hold latents of shape {c}x{h}x{w} (C x H x W) with {manifest.num_classes} "
            f"classes ({path}), which the model ({have}) cannot take: set "
            + " ".join(f"{key}={value}" for key, value in changes.items()))


def _ensure_data(cfg) -> None:
    """Prepare a built-in dataset (digits, synthetic) into data.path when the config asks and it is missing."""
    from pathlib import Path

    source = getattr(cfg.data, "prepare", None)
    path = Path(cfg.data.path)
    if source and not (path / "dataset.json").is_file():
        from moedit.data.prepare import prepare_builtin

        print(f"moedit train: preparing the built-in '{source}' dataset into {path}", flush=True)
        prepare_builtin(source, path, image_size=cfg.data.prepare_image_size)


def _print_outputs(cfg) -> None:
    from pathlib import Path

    run = Path(cfg.train.run_dir)
    samples = sorted((run / "samples").glob("*.png"))
    latest = run / "checkpoints" / "latest"
    lines = [
        f"run directory   {run}",
        f"checkpoints     {run / 'checkpoints'} (latest: {latest.read_text().strip()})" if latest.is_file() else
        f"checkpoints     none (checkpoint.final = false and no checkpoint.every step was reached)",
        f"metrics         {run / 'metrics.jsonl'}",
    ]
    if cfg.logging.tensorboard:
        lines.append(f"TensorBoard     tensorboard --logdir {run / 'tb'}")
    if (run / "routing.jsonl").is_file():
        lines.append(f"routing stats   {run / 'routing.jsonl'}  (report: moedit analyze routing {run})")
    if samples:
        lines.append(f"samples         {samples[-1]}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    from moedit.cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
