"""`diffpolicy-lerobot-export CHECKPOINT`: make a diffpolicy checkpoint folder loadable by `--policy.path`.

LeRobot 0.6.1 reads three files from a `--policy.path` folder before any plugin code runs:
config.json with a "type" field (`PreTrainedConfig.from_pretrained`, lerobot/configs/policies.py) and
policy_preprocessor.json / policy_postprocessor.json (`make_pre_post_processors` ->
`PolicyProcessorPipeline.from_pretrained`, lerobot/policies/factory.py). A diffpolicy checkpoint holds
config.yaml and model.safetensors, so this writes those three small files beside them, with LeRobot's own
serializers; the weights and our config stay where they are and are read from there at load time.
Writing nothing else, it leaves the checkpoint usable by diffpolicy exactly as before.

Running it again writes the same files (nothing to do); a file that differs (edited by hand, or written by
something else) is kept unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import filecmp
import math
import os
import shutil
import tempfile
from pathlib import Path

from lerobot.configs import FeatureType, PolicyFeature
from lerobot.utils.constants import ACTION, OBS_ENV_STATE, OBS_STATE

from diffpolicy.checkpoint import read_config

from .configuration_diffpolicy import DiffpolicyConfig, default_feature_map
from .processor_diffpolicy import make_diffpolicy_pre_post_processors

LEROBOT_FILES = ("config.json", "policy_preprocessor.json", "policy_postprocessor.json")


def lerobot_config(checkpoint: str | Path, device: str | None = None) -> DiffpolicyConfig:
    """The LeRobot config describing a diffpolicy checkpoint: its task, n_obs_steps and features."""
    meta, run_cfg = read_config(checkpoint)
    shape_meta = meta["shape_meta"]
    task = run_cfg.task.name
    feature_map = default_feature_map(shape_meta, task)
    inputs: dict[str, PolicyFeature] = {}
    for key, spec in shape_meta["obs"].items():
        feature = feature_map[key]
        if spec.get("type", "low_dim") == "rgb":
            inputs[feature] = PolicyFeature(type=FeatureType.VISUAL, shape=tuple(spec["shape"]))
            continue
        kind = FeatureType.ENV if feature == OBS_ENV_STATE else FeatureType.STATE
        size = math.prod(spec["shape"]) + (inputs[feature].shape[0] if feature in inputs else 0)
        inputs[feature] = PolicyFeature(type=kind, shape=(size,))
    if OBS_STATE in inputs and inputs[OBS_STATE].type is not FeatureType.STATE:  # pragma: no cover
        raise AssertionError("observation.state must be a STATE feature")
    outputs = {ACTION: PolicyFeature(type=FeatureType.ACTION, shape=tuple(shape_meta["action"]["shape"]))}
    return DiffpolicyConfig(
        n_obs_steps=run_cfg.policy.n_obs_steps,
        input_features=inputs,
        output_features=outputs,
        feature_map=feature_map,
        task=task,
        device=device,
    )


def export_checkpoint(
    checkpoint: str | Path, device: str | None = None, overwrite: bool = False
) -> list[Path]:
    """Write config.json and the processor files into `checkpoint` (see the module docstring); returns
    the files written (empty when identical ones are already there)."""
    checkpoint = Path(checkpoint)
    config = lerobot_config(checkpoint, device)
    pre, post = make_diffpolicy_pre_post_processors(config)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint folder {checkpoint} does not exist")
    with tempfile.TemporaryDirectory(prefix="lerobot-export-") as tmp:
        staged = Path(tmp)
        config._save_pretrained(staged)
        pre.save_pretrained(staged)
        post.save_pretrained(staged)
        produced = sorted(p.name for p in staged.iterdir())
        if sorted(LEROBOT_FILES) != produced:  # LeRobot changed its layout: say so rather than guess
            raise RuntimeError(f"LeRobot wrote {produced}, expected {sorted(LEROBOT_FILES)}")
        changed = [
            n
            for n in produced
            if not (checkpoint / n).exists() or not filecmp.cmp(staged / n, checkpoint / n, shallow=False)
        ]
        kept = [n for n in changed if (checkpoint / n).exists()]
        if kept and not overwrite:
            raise FileExistsError(
                f"{checkpoint} already holds {kept}, which differ from what this export writes; nothing was "
                "changed. Move them aside, or pass --overwrite to replace them"
            )
        for name in changed:  # each file appears whole or not at all
            part = checkpoint / f".{name}.part"
            shutil.copyfile(staged / name, part)
            os.replace(part, checkpoint / name)
    return [checkpoint / n for n in changed]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="diffpolicy-lerobot-export",
        description="Write the config.json and processor files that let LeRobot load a diffpolicy checkpoint "
        "folder with --policy.path (the checkpoint's own files are not touched).",
    )
    parser.add_argument(
        "checkpoint", help="a diffpolicy checkpoint folder (e.g. runs/NAME/checkpoints/latest)"
    )
    parser.add_argument("--device", default=None, help="device recorded in config.json (default: auto)")
    parser.add_argument("--overwrite", action="store_true", help="replace differing LeRobot files")
    args = parser.parse_args(argv)
    written = export_checkpoint(args.checkpoint, args.device, args.overwrite)
    if written:
        print("wrote " + ", ".join(str(p) for p in written))
    else:
        print(f"{args.checkpoint}: LeRobot files already up to date")
    print(f"use it with: lerobot-eval --policy.path={args.checkpoint} ...")


if __name__ == "__main__":
    main()
