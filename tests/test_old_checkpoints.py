"""Checkpoints written by older code still load and predict what they predicted when they were saved.

The folders under tests/data/checkpoints/ were written once by make_checkpoints.py (one per policy class
and network); never regenerate them to make this test pass.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from diffpolicy.policy import BasePolicy, load_policy

CHECKPOINTS = Path(__file__).parent / "data" / "checkpoints"
sys.path.insert(0, str(CHECKPOINTS))

from make_checkpoints import POLICIES, predict  # noqa: E402


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_old_checkpoint_loads_and_predicts_as_saved(name):
    path = CHECKPOINTS / name
    expected = json.loads((path / "expected.json").read_text())
    policy, _ = load_policy(path)
    assert type(policy).__name__ == expected["policy_class"]
    assert torch.allclose(predict(policy), torch.tensor(expected["action"]), atol=1e-5)
    again = BasePolicy.from_pretrained(path)
    assert torch.allclose(predict(again), torch.tensor(expected["action"]), atol=1e-5)


def test_every_policy_class_has_a_checkpoint():
    from diffpolicy.policy import POLICY_TYPES

    saved = {json.loads((CHECKPOINTS / n / "expected.json").read_text())["policy_class"] for n in POLICIES}
    assert saved == {cls.__name__ for cls in POLICY_TYPES.values()}
