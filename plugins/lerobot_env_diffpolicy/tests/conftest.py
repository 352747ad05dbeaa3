"""The env plugin's checks run in the Python >= 3.12 environment of scripts/lerobot-plugin-env.sh (the main
suite, tests/, never imports lerobot)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoints import make_task_checkpoint

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def so101_state_ckpt(tmp_path_factory) -> Path:
    return make_task_checkpoint(tmp_path_factory.mktemp("ckpt") / "so101_state", "so101_grasp_state_unet_cpu")


@pytest.fixture(scope="session")
def so101_image_ckpt(tmp_path_factory) -> Path:
    # 48x64 cameras (the task's 3:4), cropped to 40x56: small for a quick check
    return make_task_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "so101_image",
        "so101_grasp_image_unet_cpu",
        "task.kwargs.image_shape=[48,64]",
        "policy.vision.crop_shape=[40,56]",
    )


@pytest.fixture(scope="session")
def pusht_state_ckpt(tmp_path_factory) -> Path:
    return make_task_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "pusht", "pusht_state_unet_cpu", scale=512.0
    )
