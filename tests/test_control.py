import numpy as np
import pytest
import torch
from test_policy import build

from diffpolicy.config import EvalConfig
from diffpolicy.control import RecedingHorizonController, TemporalEnsembler
from diffpolicy.evaluation import configure_inference


class RecordingPolicy(torch.nn.Module):
    """Returns chunks whose values say which call made them and at which offset: 100*call + offset."""

    def __init__(self, horizon=6, n_obs_steps=2, n_action_steps=3, rgb=False):
        super().__init__()
        self.horizon, self.n_obs_steps, self.n_action_steps = horizon, n_obs_steps, n_action_steps
        obs = {"pos": {"shape": [2], "type": "low_dim"}}
        if rgb:
            obs["cam"] = {"shape": [3, 4, 5], "type": "rgb"}
        self.shape_meta = {"obs": obs, "action": {"shape": [2]}}
        self.windows = []
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return torch.device("cpu")

    def predict_action(self, obs, generator=None):
        self.windows.append({k: v.clone() for k, v in obs.items()})
        B = obs["pos"].shape[0]
        call = len(self.windows)
        values = 100.0 * call + torch.arange(self.horizon, dtype=torch.float32)
        pred = values[None, :, None].expand(B, self.horizon, 2).clone()
        start = self.n_obs_steps - 1
        return {"action": pred[:, start : start + self.n_action_steps], "action_pred": pred}


def obs_at(t, n=2):
    return {"pos": np.full((n, 2), float(t), dtype=np.float32)}


def test_history_starts_with_copies_of_the_first_observation_and_slides():
    policy = RecordingPolicy(n_obs_steps=3, horizon=6, n_action_steps=2)
    ctrl = RecedingHorizonController(policy)
    for t in range(5):
        ctrl.act(obs_at(t))
    # predictions at steps 0, 2, 4; window = last 3 observations, padded with the first at the start
    assert [w["pos"][0, :, 0].tolist() for w in policy.windows] == [[0, 0, 0], [0, 1, 2], [2, 3, 4]]


def test_actions_come_from_offset_n_obs_steps_minus_one_and_refill_every_n_action_steps():
    policy = RecordingPolicy(horizon=6, n_obs_steps=2, n_action_steps=3)
    ctrl = RecedingHorizonController(policy)
    actions = [ctrl.act(obs_at(t))[0, 0] for t in range(7)]
    assert actions == [101, 102, 103, 201, 202, 203, 301]
    assert ctrl.last_chunk.shape == (2, 5, 2)  # horizon - n_obs_steps + 1 executable steps


def test_fresh_chunk_slides_the_window_and_queues_nothing():
    policy = RecordingPolicy(n_obs_steps=2, horizon=6, n_action_steps=3)
    ctrl = RecedingHorizonController(policy)
    chunks = [ctrl.fresh_chunk(obs_at(t)) for t in range(3)]
    assert [c[0, :, 0].tolist() for c in chunks] == [
        [101, 102, 103, 104, 105],
        [201, 202, 203, 204, 205],
        [301, 302, 303, 304, 305],
    ]  # a new chunk per call
    assert [w["pos"][0, :, 0].tolist() for w in policy.windows] == [[0, 0], [0, 1], [1, 2]]
    assert ctrl.step == 0 and ctrl.last_chunk is None  # nothing queued for act()


def test_reset_forgets_history_and_queue():
    policy = RecordingPolicy()
    ctrl = RecedingHorizonController(policy)
    ctrl.act(obs_at(5))
    ctrl.act(obs_at(6))
    ctrl.reset()
    assert ctrl.act(obs_at(9))[0, 0] == 201  # a fresh chunk at the episode start
    assert policy.windows[-1]["pos"][0, :, 0].tolist() == [9, 9]


def test_temporal_ensembling_blends_overlapping_chunks_with_act_weights():
    policy = RecordingPolicy(horizon=6, n_obs_steps=2, n_action_steps=1)
    ctrl = RecedingHorizonController(policy, temporal_ensemble=True, ensemble_decay=0.5)
    a0 = ctrl.act(obs_at(0))[0, 0]
    a1 = ctrl.act(obs_at(1))[0, 0]
    a2 = ctrl.act(obs_at(2))[0, 0]
    assert a0 == pytest.approx(101)
    w = np.exp(-0.5 * np.arange(2)) / np.exp(-0.5 * np.arange(2)).sum()
    assert a1 == pytest.approx(w[0] * 102 + w[1] * 201)  # oldest chunk weighs most (ACT)
    w = np.exp(-0.5 * np.arange(3)) / np.exp(-0.5 * np.arange(3)).sum()
    assert a2 == pytest.approx(w @ np.array([103, 202, 301]))


def test_ensembler_drops_expired_chunks():
    ens = TemporalEnsembler(0.0)
    ens.add(0, np.zeros((1, 2, 1)))
    ens.add(2, np.ones((1, 2, 1)))
    assert ens.blend(2)[0, 0] == 1.0 and len(ens.chunks) == 1
    with pytest.raises(RuntimeError, match="no predicted chunk covers step 9"):
        ens.blend(9)


def test_images_are_converted_at_the_policy_boundary():
    policy = RecordingPolicy(rgb=True)
    ctrl = RecedingHorizonController(policy)
    cam = np.full((2, 4, 5, 3), 255, dtype=np.uint8)
    ctrl.act({"pos": np.zeros((2, 2), np.float32), "cam": cam})
    window = policy.windows[0]["cam"]
    assert window.shape == (2, 2, 3, 4, 5) and window.dtype == torch.float32 and window.max() == 1.0


def test_bad_inputs():
    policy = RecordingPolicy(horizon=6, n_obs_steps=2)
    with pytest.raises(ValueError, match="n_action_steps=6 must be in"):
        RecedingHorizonController(policy, n_action_steps=6)
    with pytest.raises(ValueError, match="n_action_steps=0 must be in"):  # not the policy's 3 in disguise
        RecedingHorizonController(policy, n_action_steps=0)
    with pytest.raises(KeyError, match="lacks 'pos'"):
        RecedingHorizonController(policy).act({"other": np.zeros((2, 2))})


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_configure_inference_takes_zero_steps_at_its_word(objective):
    """None keeps the checkpoint's sampling steps; 0 is refused by the policy, not read as None."""
    overrides = ("policy.objective=flow", "policy.scheduler.sampler=euler") if objective == "flow" else ()
    policy = build(*overrides).eval()
    configure_inference(policy, EvalConfig())
    assert policy.num_inference_steps == 10  # tests/conftest.py TINY
    with pytest.raises(ValueError, match="num_inference_steps"):
        configure_inference(policy, EvalConfig(num_inference_steps=0))
    configure_inference(policy, EvalConfig(num_inference_steps=3))
    assert policy.num_inference_steps == 3
