"""Command line: diffpolicy collect | train | distill | eval | serve | export | record | demo | bench | ...

collect, train, demo and bench take `--preset NAME` (a YAML file in diffpolicy/configs, or a path) and any
number of dotted overrides such as `train.batch_size=64 policy.net=transformer`; eval, serve and distill
start from a checkpoint's own config and take overrides only.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from diffpolicy.config import ConfigError, RunConfig, available_presets, load_config
from diffpolicy.interrupt import exit_code, graceful_stop


def _run_dir(cfg: RunConfig, explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    if cfg.run_dir:
        return Path(cfg.run_dir)
    return Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_collect(args: argparse.Namespace) -> int:
    from diffpolicy.collect import collect

    overrides = list(args.overrides)
    if args.task:
        overrides.append(f"task.name={args.task}")
    if args.episodes is not None:
        overrides.append(f"collect.n_episodes={args.episodes}")
    if args.workers is not None:
        overrides.append(f"collect.n_workers={args.workers}")
    if args.seed is not None:
        overrides.append(f"collect.seed={args.seed}")
    if args.keep_failed:
        overrides.append("collect.keep_failed=true")
    if args.format is not None:
        overrides.append(f"collect.format={args.format}")
    cfg = load_config(args.preset, overrides)
    lerobot = cfg.collect.format == "lerobot"
    out = args.out or cfg.collect.output or f"data/{cfg.task.name}{'' if lerobot else '.zarr'}"
    if lerobot:
        from diffpolicy.collect import collect_lerobot, kwargs_label, mix_summary
        from diffpolicy.data.formats import describe

        collect_lerobot(cfg, out, overwrite=args.overwrite)
        info = describe(out)
        print(
            f"wrote {info['n_episodes']} episodes ({info['n_frames']} frames, {info['fps']:g} fps) to {out} "
            "(LeRobot v3.0)"
        )
        groups = info.get("mix") or []
    else:
        from diffpolicy.collect import kwargs_label, mix_summary

        store = collect(cfg, out, overwrite=args.overwrite)
        print(f"wrote {store.n_episodes} episodes ({store.n_steps} steps) to {out}")
        groups = mix_summary(store.attrs["episodes"], store.episode_lengths) if cfg.collect.mix else []
    for g in groups if len(groups) > 1 else []:
        print(f"  group {g['group']} ({kwargs_label(g['task_kwargs'])}): {g['n_episodes']} episodes")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from diffpolicy.training.trainer import Trainer

    cfg = load_config(args.preset, _with_episodes(args))
    run_dir = _run_dir(cfg, args.run_dir)
    if not cfg.data.path and not (run_dir / "demos.zarr").exists():
        raise ConfigError(
            "data.path is empty and the run folder has no demos.zarr: collect first "
            "(diffpolicy collect ...) and pass data.path=<store>"
        )
    _check_against_training_seeds(cfg, run_dir)  # the Trainer checks again; here before any folder exists
    report = Trainer(cfg, run_dir, resume=not args.no_resume, overwrite=args.overwrite).fit()
    if report:  # empty on ranks other than 0 under torchrun
        _print_summary(report, run_dir / "eval")
    return exit_code(report["interrupted"]) if report.get("interrupted") else 0


def cmd_distill(args: argparse.Namespace) -> int:
    from diffpolicy.distill import DistillTrainer, distill_config

    _refuse_preset(
        args,
        "the distillation starts from the teacher's own run config; change it with "
        "distill.* / train.* overrides",
    )
    cfg = distill_config(args.teacher, _with_episodes(args))
    run_dir = _run_dir(cfg, args.run_dir)
    report = DistillTrainer(cfg, run_dir, resume=not args.no_resume, overwrite=args.overwrite).fit()
    if report:  # empty on ranks other than 0 under torchrun
        _print_summary(report, run_dir / "eval")
        print(f"student: {run_dir / 'checkpoints' / 'latest'}")
    return exit_code(report["interrupted"]) if report.get("interrupted") else 0


def _with_episodes(args: argparse.Namespace) -> list[str]:
    """The overrides, and `--episodes N` as eval.n_episodes=N (the final evaluation, as in eval)."""
    extra = [] if args.episodes is None else [f"eval.n_episodes={args.episodes}"]
    return list(args.overrides) + extra


def _refuse_preset(args: argparse.Namespace, why: str) -> None:
    """Commands that start from a checkpoint's config take no preset: say so instead of 'unrecognized'."""
    if args.preset is not None:
        raise ConfigError(f"diffpolicy {args.command} takes no --preset: {why}")


def _only_eval_overrides(command: str, overrides: list[str], task_kwargs: bool = False) -> None:
    """Only evaluation settings may be overridden: the policy is what the checkpoint says it is. With
    `task_kwargs` (eval), task.kwargs.* may change the environment it is evaluated in (e.g. one group of
    a collection mix, task.kwargs.n_objects=2, or a held-out condition)."""
    allowed = ("eval.", "task.kwargs.") if task_kwargs else ("eval.",)
    bad = [o for o in overrides if not o.startswith(allowed)]
    if bad:
        what = "eval.* and task.kwargs.*" if task_kwargs else "eval.*"
        raise ConfigError(f"diffpolicy {command} accepts only {what} overrides, got {bad}")


def _checkpoint_folder_around(path: Path) -> Path | None:
    """The checkpoint folder that `path` is (or lies inside), or None."""
    from diffpolicy.checkpoint import CONFIG_FILE, WEIGHTS_FILE

    for folder in (path, *path.parents):
        if (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
            return folder
    return None


def eval_output_dir(checkpoint: str | Path | None, out: str | None, remote: str | None = None) -> Path:
    """Where `diffpolicy eval` writes its report: `out`, or beside the run's checkpoints — never inside a
    checkpoint folder, which the next save replaces (and deletes what was written there), and never over
    an earlier report.

    `<run>/checkpoints/<name...>` -> `<run>/eval_checkpoints/<name...>-<time>`; a checkpoint elsewhere ->
    `<checkpoint>-eval-<time>` beside it; a served policy (`remote`, host:port) ->
    `runs/eval-remote-<host>_<port>-<time>`. The time stamp (and a -2, -3... suffix within one second)
    keeps earlier reports; an `out` that already holds one is refused."""
    if out:
        inside = _checkpoint_folder_around(Path(out).resolve())
        if inside is not None:
            raise ConfigError(
                f"--out {out} lies inside the checkpoint folder {inside}, which the next save replaces "
                "(deleting the report): choose a folder outside it"
            )
        if (Path(out) / "report.json").exists():
            raise FileExistsError(
                f"--out {out} already holds a report (report.json): choose another folder, or move that "
                "report away first"
            )
        return Path(out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if remote is not None:
        base = Path("runs") / f"eval-remote-{re.sub(r'[^A-Za-z0-9.-]+', '_', remote)}-{stamp}"
    else:
        ckpt = Path(checkpoint)
        parts = ckpt.resolve().parts
        if "checkpoints" in parts[:-1]:
            i = len(parts) - 1 - parts[::-1].index("checkpoints")
            run = Path(*parts[:i])
            base = run / "eval_checkpoints" / f"{'_'.join(parts[i + 1 :])}-{stamp}"
        else:
            base = ckpt.parent / f"{ckpt.name}-eval-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


# eval.* settings that configure_inference applies to the policy itself: a served policy's are the server's
_SERVER_SIDE = tuple(
    f"eval.{k}"
    for k in ("sampler", "num_inference_steps", "timestep_spacing", "noise_scale", "precision", "compile")
)


def cmd_eval(args: argparse.Namespace) -> int:
    from diffpolicy.config import with_overrides
    from diffpolicy.evaluation import evaluate
    from diffpolicy.policy import load_policy
    from diffpolicy.tasks import make_task
    from diffpolicy.training.trainer import resolve_device

    _refuse_preset(args, CHECKPOINT_CONFIG)
    _only_eval_overrides("eval", args.overrides, task_kwargs=True)
    if args.remote and args.checkpoint:
        raise ConfigError("diffpolicy eval takes --checkpoint or --remote, not both")
    if args.remote:  # the served policy; its sampler settings are the server's (diffpolicy serve ...)
        sampling = [o for o in args.overrides if o.split("=", 1)[0] in _SERVER_SIDE]
        if sampling:
            raise ConfigError(
                f"eval --remote cannot change how the server samples: {sampling} belong to "
                "`diffpolicy serve --checkpoint ... eval.sampler=...`"
            )
        from diffpolicy.config import from_dict
        from diffpolicy.serving.client import PolicyClient, RemotePolicy

        policy = RemotePolicy(PolicyClient(args.remote))
        saved = from_dict(policy.client.info()["run"])
        label = f"{args.remote} (served)"
    elif args.checkpoint:
        policy, saved = load_policy(args.checkpoint, device=resolve_device(args.device))
        label = str(args.checkpoint)
    else:
        raise ConfigError("diffpolicy eval needs --checkpoint or --remote HOST:PORT")
    cfg = with_overrides(saved, args.overrides)
    if args.episodes:
        cfg.eval.n_episodes = args.episodes
    if args.checkpoint:  # a served policy's config names no data (the server keeps paths to itself)
        _check_against_training_seeds(cfg)
    if not cfg.task.name:
        raise ConfigError(f"{label} was trained on a dataset without a task: no simulator to evaluate it in")
    task = make_task(cfg.task.name, **cfg.task.kwargs)
    out = eval_output_dir(args.checkpoint, args.out, args.remote)
    with graceful_stop():  # SIGINT / SIGTERM: a partial report of the finished episodes
        report = evaluate(policy, task, cfg.eval, out, label=label)
    _print_summary(report, out)
    if args.remote and policy.latencies:
        lat = policy.latencies
        print("mean latency (ms): " + ", ".join(f"{k} {np.mean([x[k] for x in lat]):.2f}" for k in lat[0]))
    return exit_code(report["interrupted"]) if report.get("interrupted") else 0


def _check_against_training_seeds(cfg: RunConfig, run_dir: Path | None = None) -> None:
    """The evaluation seeds must not reach the seeds of the demonstrations the policy trains (or was
    trained) on, where the store is at data.path (or <run_dir>/demos.zarr) and records them (collect and
    record do). With `run_dir` (train) the periodic evaluations' range is checked too."""
    from diffpolicy.collect import check_unseen_evaluation_seeds
    from diffpolicy.data.episodes import EpisodeStore
    from diffpolicy.data.formats import detect_format

    if cfg.data.path:
        path = Path(cfg.data.path)
    elif run_dir is not None:
        path = run_dir / "demos.zarr"
    else:  # a checkpoint whose run read its own demos.zarr: the config does not say where that run was
        return
    try:
        if not path.exists() or detect_format(path) != "episode_store":
            return
        store = EpisodeStore.open(path)
    except (OSError, ValueError):  # moved, unreadable or foreign data: nothing recorded to check against
        return
    check_unseen_evaluation_seeds(cfg, store, path, periodic=run_dir is not None)


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from diffpolicy.policy import load_policy
    from diffpolicy.serving.export import ExportedPolicy, example_obs, export_policy

    policy, _ = load_policy(args.checkpoint)
    out = Path(args.out or Path(args.checkpoint).parent / f"{Path(args.checkpoint).name}-torchscript")
    inside = _checkpoint_folder_around(out.resolve())
    if inside is not None:
        raise ConfigError(
            f"--out {out} lies inside the checkpoint folder {inside}, which the next save replaces: choose "
            "a folder outside it"
        )
    export_policy(policy, out, overwrite=args.overwrite)
    exported = ExportedPolicy(out)
    obs = example_obs(policy.shape_meta, policy.n_obs_steps, batch=4)
    ref = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))["action_pred"]
    got = exported.predict_action(obs, generator=torch.Generator().manual_seed(0))["action_pred"]
    diff = float((ref - got).abs().max())
    print(f"exported {args.checkpoint} to {out} (TorchScript); max |action - PyTorch| = {diff:.3g}")
    return 0 if diff <= args.tolerance else 1


def cmd_record(args: argparse.Namespace) -> int:
    from diffpolicy.tasks.record import record_pusht

    if args.task != "pusht":
        raise ValueError(f"record supports --task pusht only, not {args.task!r}")
    out = args.out or ("data/pusht_teleop.zarr" if args.format == "zarr" else "data/pusht_teleop")
    kept = record_pusht(
        out,
        args.episodes,
        obs_type=args.obs,
        seed=args.seed,
        fps=args.fps,
        fmt=args.format,
        overwrite=args.overwrite,
    )
    print(f"kept {kept} episode(s) in {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from diffpolicy.config import to_dict, with_overrides
    from diffpolicy.evaluation import configure_inference
    from diffpolicy.policy import load_policy
    from diffpolicy.serving.server import TOKEN_ENV, PolicyServer
    from diffpolicy.training.trainer import resolve_device

    _refuse_preset(args, CHECKPOINT_CONFIG)
    _only_eval_overrides("serve", args.overrides)
    policy, saved = load_policy(args.checkpoint, device=resolve_device(args.device))
    cfg = with_overrides(saved, args.overrides)
    configure_inference(policy, cfg.eval)
    server = PolicyServer(
        policy,
        to_dict(cfg),
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        batch_window_ms=args.batch_window_ms,
        seed=args.seed,
        max_queue=args.max_queue,
        token=args.token or os.environ.get(TOKEN_ENV),
    ).start()
    print(f"serving {args.checkpoint} on {server.address} (Ctrl+C or SIGTERM stops)", flush=True)
    server.serve_until_signal(args.max_seconds)
    print(f"stopped after {server.batches_run} batches", flush=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from diffpolicy.demo import run_demo

    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    result = run_demo(out, preset=args.preset, overrides=args.overrides)
    print(f"\nreport: {result['report']}")
    print("acceptance: " + ("PASS" if result["passed"] else "FAIL"))
    return 0 if result["passed"] or not args.strict else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from diffpolicy.bench import run_bench

    presets = args.preset or ["trajectory2d_lowdim_unet", "pusht_state_unet", "pusht_image_unet"]
    run_bench(
        presets, args.device, args.batch_size, args.warmup, args.repeats, args.out, args.overrides, args.data
    )
    return 0


def _format_stats(stats: dict) -> str:
    parts = []
    for name in ("min", "max", "mean", "std"):
        if name in stats:
            values = np.asarray(stats[name], dtype=float).reshape(-1)
            shown = ", ".join(f"{v:.4g}" for v in values[:6]) + (", ..." if values.size > 6 else "")
            parts.append(f"{name} [{shown}]")
    return "  ".join(parts)


def cmd_dataset_info(args: argparse.Namespace) -> int:
    from diffpolicy.data.formats import describe

    info = describe(args.path, flatten_obs=args.flatten, progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    lengths = info["episode_length"]
    print(f"{info['path']}: {info['format']}")
    print(
        f"  episodes {info['n_episodes']}, frames {info['n_frames']} (episode length {lengths.get('min')}-"
        f"{lengths.get('max')}, mean {lengths.get('mean', 0):.1f}), fps {info['fps']}"
    )
    print("  keys:")
    for key, meta in info["keys"].items():
        extra = f" <- {meta['source']}" if "source" in meta else ""
        kind = f" {meta['type']}" if "type" in meta else ""
        dtype = f" {meta['dtype']}" if "dtype" in meta else ""
        print(f"    {key}: shape {meta.get('shape')}{kind}{dtype}{extra}")
    print(f"  shape_meta (what training infers): {json.dumps(info['shape_meta'])}")
    if info.get("tasks"):
        print(f"  tasks ({len(info['tasks'])}): " + "; ".join(repr(t) for t in info["tasks"]))
    if info.get("mix"):
        from diffpolicy.collect import kwargs_label

        fps = info["fps"]
        print(f"  mix ({len(info['mix'])} groups):")
        for g in info["mix"]:
            mean_s = f", mean {g['frames'] / g['n_episodes'] / fps:.1f} s" if fps else ""
            seeds = f", seeds {g['seed_range'][0]}..{g['seed_range'][1]}" if g.get("seed_range") else ""
            print(
                f"    group {g['group']} ({kwargs_label(g['task_kwargs'])}): {g['n_episodes']} episodes, "
                f"{g['frames']} frames{mean_s}{seeds}" + (f" - {g['task']!r}" if g.get("task") else "")
            )
    print(f"  stats{' (' + info['stats_source'] + ')' if 'stats_source' in info else ''}:")
    for key, stats in info["stats"].items():
        print(f"    {key}: {_format_stats(stats)}")
    return 0


def cmd_dataset_convert(args: argparse.Namespace) -> int:
    from diffpolicy.data.episodes import EpisodeStore
    from diffpolicy.data.formats import detect_format, import_dataset, read_dataset
    from diffpolicy.data.formats.lerobot import write_lerobot

    src, dst = Path(args.src), Path(args.dst)
    fmt = detect_format(src)
    to = args.to or ("zarr" if dst.name.endswith((".zarr", ".zarr.zip")) else "lerobot")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ValueError(f"refusing to write {dst} inside the source {src}")
    if dst.exists() and not args.overwrite:
        raise FileExistsError(f"{str(dst)!r} already exists; pass --overwrite to replace it")
    progress = not args.quiet
    if to == "zarr":
        if fmt == "episode_store":
            raise ValueError(f"{src} is already an EpisodeStore")
        store = import_dataset(
            read_dataset(src, fmt, flatten_obs=args.flatten),
            dst,
            overwrite=args.overwrite,
            progress=progress,
            image_size=args.image_size,
        )
        print(f"wrote {store.n_episodes} episodes ({store.n_steps} frames) of {src} ({fmt}) to {dst}")
        return 0
    if fmt == "episode_store":
        if args.image_size:
            raise ValueError(
                "--image-size resizes a dataset being imported; an EpisodeStore is exported as it is"
            )
        store = EpisodeStore.open(src)
        write_lerobot(store, dst, fps=args.fps, task=args.task, overwrite=args.overwrite, progress=progress)
    else:  # through a temporary EpisodeStore beside dst, removed afterwards
        import tempfile

        dst.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{dst.name}.", dir=dst.parent) as tmp:
            store = import_dataset(
                read_dataset(src, fmt, flatten_obs=args.flatten),
                Path(tmp) / "store.zarr",
                progress=progress,
                image_size=args.image_size,
            )
            write_lerobot(
                store, dst, fps=args.fps, task=args.task, overwrite=args.overwrite, progress=progress
            )
    print(
        f"wrote {store.n_episodes} episodes ({store.n_steps} frames) of {src} ({fmt}) to {dst} (LeRobot v3.0)"
    )
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    for name in available_presets():
        print(name)
    return 0


def _print_summary(report: dict, out: Path) -> None:
    from diffpolicy.evaluation import interrupted_note

    if "paused_at_step" in report and report.get("interrupted"):
        print(
            f"stopped by {report['interrupted']} at step {report['paused_at_step']}: checkpoint in "
            f"{out.parent / 'checkpoints' / 'latest'}; run the same command again to resume"
        )
        return
    if report.get("already_paused"):
        print(
            f"the run is already paused at step {report['paused_at_step']} (train.stop_at_step / "
            "train.max_minutes reached): nothing was done; raise them (0: off) to continue"
        )
        return
    if "paused_at_step" in report:
        print(
            f"paused at step {report['paused_at_step']} (train.stop_at_step / train.max_minutes): checkpoint "
            f"in {out.parent / 'checkpoints' / 'latest'}; rerun with a higher limit (0: off) to resume"
        )
        return
    if report["n_episodes"] == 0:
        print("no final evaluation (eval.n_episodes=0)")
        return
    if report.get("interrupted"):
        print(f"{interrupted_note(report)}: a partial report in {out}")
        if report["n_episodes"] == 0:
            return
    lo, hi = report["success_ci95"]
    print(
        f"success {report['success_rate']:.3f} (95% CI {lo:.3f}-{hi:.3f}) over {report['n_episodes']} "
        f"episodes, mean max reward {report['mean_max_reward']:.3f}; report in {out}"
    )
    extra = {k: v for k, v in report["task_metrics"].items() if isinstance(v, float | int)}
    if extra:
        print(json.dumps(extra, indent=None))


CHECKPOINT_CONFIG = (
    "a checkpoint runs with the config it was trained with (its config.yaml); change evaluation settings "
    "with eval.* overrides"
)
EPISODES_HELP = "episodes of the final evaluation (eval.n_episodes; 0 skips it)"
OVERWRITE_HELP = "start again in a folder holding a run: its outputs move to <run-dir>/replaced-<time>/"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffpolicy", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log to the console too")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_preset(p: argparse.ArgumentParser, default: str | None = None) -> None:
        p.add_argument("--preset", default=default, help=f"preset name or YAML path ({default or 'none'})")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=64")

    def no_preset(p: argparse.ArgumentParser) -> None:  # read only to explain the refusal (_refuse_preset)
        p.add_argument("--preset", help=argparse.SUPPRESS)

    p = sub.add_parser("collect", help="run a scripted expert into an EpisodeStore or a LeRobot dataset")
    p.add_argument("--task", help="task name (overrides the preset's)")
    p.add_argument("--episodes", type=int, help="number of episodes to keep (a collect.mix is scaled to it)")
    p.add_argument("--workers", type=int, help="parallel processes")
    p.add_argument("--seed", type=int, help="first collection seed")
    p.add_argument("--keep-failed", action="store_true", help="keep episodes the expert failed")
    p.add_argument(
        "--format",
        choices=["zarr", "lerobot"],
        help="EpisodeStore or LeRobot v3.0 folder (collect.format; default zarr)",
    )
    p.add_argument("--out", help="output: a .zarr store, or the LeRobot folder (default data/<task>[.zarr])")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    with_preset(p)
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("train", help="train a policy; resumes from <run-dir>/checkpoints/latest")
    p.add_argument("--run-dir", help="run folder (default runs/<name>-<time>)")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--episodes", type=int, help=EPISODES_HELP)
    with_preset(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "distill", help="consistency-distil a trained diffusion policy into a 1-3 step policy (resumes)"
    )
    p.add_argument("--teacher", required=True, help="the teacher's checkpoint folder")
    p.add_argument("--run-dir", help="run folder (default runs/<teacher name>-consistency-<time>)")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--episodes", type=int, help=EPISODES_HELP)
    no_preset(p)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. distill.num_steps=500")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("eval", help="evaluate a checkpoint in closed loop")
    p.add_argument("--checkpoint", help="checkpoint folder (or --remote)")
    p.add_argument(
        "--remote",
        metavar="HOST:PORT",
        help="evaluate the policy served there (diffpolicy serve; token: $DIFFPOLICY_SERVE_TOKEN)",
    )
    p.add_argument("--episodes", type=int, help="episodes to evaluate (eval.n_episodes)")
    p.add_argument(
        "--out",
        help="report folder, not one holding a report (default <run>/eval_checkpoints/<checkpoint>-<time>, "
        "never inside it; --remote: runs/eval-remote-<host>_<port>-<time>)",
    )
    p.add_argument("--device", default="auto")
    no_preset(p)
    p.add_argument("overrides", nargs="*", help="eval.* and task.kwargs.* overrides, e.g. eval.sampler=ddim")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="serve a checkpoint over gRPC to PolicyClient / eval --remote clients")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=50051, help="port (0: any free port)")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--max-batch", type=int, default=64, help="most rows in one policy call, and in one request"
    )
    p.add_argument("--batch-window-ms", type=float, default=2.0, help="how long a batch waits for more")
    p.add_argument(
        "--max-queue", type=int, default=32, help="requests waiting before new ones are refused (busy)"
    )
    p.add_argument(
        "--token",
        help="shared token clients must send (default: $DIFFPOLICY_SERVE_TOKEN; the variable keeps it out "
        "of the process list)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noise shared by mixed batches")
    p.add_argument("--max-seconds", type=float, help="stop by itself after this long")
    no_preset(p)
    p.add_argument("overrides", nargs="*", help="eval.* inference overrides, e.g. eval.sampler=ddim")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="TorchScript export (encoder + noise net), checked against PyTorch")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", help="export folder (default <checkpoint>-torchscript beside it)")
    p.add_argument("--tolerance", type=float, default=1e-5, help="max |action difference| accepted")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "record", help="record demonstrations by teleoperation (mouse; Enter keeps, Left redoes, q quits)"
    )
    p.add_argument("--task", default="pusht")
    p.add_argument("--episodes", type=int, default=10, help="episodes to keep")
    p.add_argument("--obs", choices=["state", "image"], default="state", help="which observations to store")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the first episode's initial state (keep demonstrations below eval.seed, 100000)",
    )
    p.add_argument("--fps", type=float, default=10.0, help="control rate (Push-T: 10 Hz)")
    p.add_argument(
        "--format", choices=["zarr", "lerobot"], default="zarr", help="EpisodeStore or LeRobot v3.0"
    )
    p.add_argument("--out", help="output (default data/pusht_teleop.zarr, or data/pusht_teleop for lerobot)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("demo", help="collect + train (diffusion and MSE-BC) + evaluate + report, on CPU")
    p.add_argument("--out", help="demo folder (default runs/demo-<time>)")
    p.add_argument("--strict", action="store_true", help="exit 1 if the acceptance checks fail")
    with_preset(p, "trajectory2d_lowdim_unet")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="time training steps and action chunks (prints a table, writes JSON)")
    p.add_argument("--preset", action="append", help="preset to time (repeatable; default: three main ones)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, help="training batch (default: the preset's)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="JSON file for the results")
    p.add_argument("--data", help="EpisodeStore to also time data loading from (the presets' obs keys)")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every preset")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "dataset", help="inspect or convert datasets (EpisodeStore, LeRobot, robomimic, Minari)"
    )
    dsub = p.add_subparsers(dest="dataset_command", required=True)
    flatten_help = (
        "Minari: observation parts concatenated into 'state' (default: observation desired_goal for "
        "goal-style data, none otherwise; --flatten with no names keeps every part)"
    )
    q = dsub.add_parser("info", help="episodes, frames, keys, shapes, fps, stats of a dataset")
    q.add_argument("path")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.add_argument("--flatten", nargs="*", default=None, help=flatten_help)
    q.set_defaults(func=cmd_dataset_info)
    q = dsub.add_parser(
        "convert",
        help="any dataset -> an EpisodeStore when DST ends in .zarr, else a LeRobot v3.0 folder",
    )
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument(
        "--to", choices=["zarr", "lerobot"], help="default: zarr when DST ends in .zarr, else lerobot"
    )
    q.add_argument("--fps", type=float, help="frame rate for LeRobot (default: the store's fps attribute)")
    q.add_argument("--task", default="", help="LeRobot task description (default: the store's task)")
    q.add_argument("--flatten", nargs="*", default=None, help=flatten_help)
    q.add_argument(
        "--image-size", nargs=2, type=int, metavar=("H", "W"), help="resize cameras when importing a dataset"
    )
    q.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_dataset_convert)

    p = sub.add_parser("presets", help="list the bundled presets")
    p.set_defaults(func=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may stand anywhere (`train a=1 --preset p b=2`); argparse alone takes one positional run.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"'{args.command}' takes no overrides: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    console = logging.StreamHandler()
    console.setLevel(logging.INFO if args.verbose else logging.WARNING)
    console.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("diffpolicy").addHandler(console)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # outside graceful_stop (start-up), or a second Ctrl-C while stopping
        if args.verbose:
            raise
        print(f"diffpolicy {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ConfigError, FileExistsError, FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
        if args.verbose:
            raise
        print(f"diffpolicy {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # permissions, a full disk, a read-only file system: one line, not a traceback
        if args.verbose:
            raise
        print(f"diffpolicy {args.command}: error: {describe_os_error(e)}", file=sys.stderr)
        return 1


def describe_os_error(e: OSError) -> str:
    """One line for a file-system error, in the user's terms (what failed, where, what to do)."""
    where = f" ({e.filename})" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return (
            f"the disk is full{where}: free space and rerun the same command (a training run resumes from "
            "its last complete checkpoint; nothing written before was lost)"
        )
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}: choose a folder you can write to, or fix its permissions"
    if e.errno == errno.EROFS:
        return f"read-only file system{where}: choose a writable folder"
    return f"{e.strerror or e}{where}"


if __name__ == "__main__":
    sys.exit(main())
