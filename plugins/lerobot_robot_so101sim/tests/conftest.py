"""The robot plugin's checks run in the Python >= 3.12 environment of scripts/lerobot-plugin-env.sh."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# the tiny-checkpoint helper of the env plugin's tests
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "lerobot_env_diffpolicy" / "tests"))
from checkpoints import make_task_checkpoint  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def so101_state_ckpt(tmp_path_factory) -> Path:
    return make_task_checkpoint(tmp_path_factory.mktemp("ckpt") / "so101_state", "so101_grasp_state_unet_cpu")
