"""Evaluation accounting against a fake task whose outcome per seed is known: seeds, the padded last batch,
vector-env autoreset, success at any step (not only the last), episode lengths, rewards and actions."""

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

from diffpolicy.config import EvalConfig
from diffpolicy.evaluation import evaluate, run_rollouts
from diffpolicy.tasks.base import Task

# seed -> (episode length, the one step (1-based) at which info["is_success"] is true, or None)
OUTCOMES = {
    100: (4, 2),  # succeeds at step 2 and is no longer "successful" at its last step
    101: (2, None),  # ends first in its batch: its env autoresets while 100 still runs
    102: (3, 3),
    103: (7, None),  # longer than eval.max_steps=5: cut there
    104: (2, 1),
    105: (1, 1),  # only ever runs as padding of the last batch (5 episodes, 2 envs): never reported
}
TRAP_REWARD = 5.0  # an autoreset (unseeded) episode succeeds at once with this reward: counting it is a bug


class KnownOutcomeEnv(gym.Env):
    """Observation t (the step count); reward 0.1 * t, 1.0 at the success step."""

    observation_space = gym.spaces.Dict({"t": gym.spaces.Box(-1e3, 1e3, shape=(1,), dtype=np.float32)})
    action_space = gym.spaces.Box(-1e3, 1e3, shape=(1,), dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.trap = seed is None  # the vector env's autoreset after an episode ends
        self.length, self.success_step = (3, 1) if self.trap else OUTCOMES[seed]
        self.t = 0
        return self._obs(), {"is_success": self.trap}

    def _obs(self):
        return {"t": np.array([self.t + (1000 if self.trap else 0)], dtype=np.float32)}

    def step(self, action):
        self.t += 1
        success = self.trap or self.t == self.success_step
        reward = TRAP_REWARD if self.trap else (1.0 if success else 0.1 * self.t)
        return self._obs(), reward, self.t >= self.length, False, {"is_success": success}


class KnownOutcomeTask(Task):
    name = "known_outcome"
    max_episode_steps = 50

    def shape_meta(self):
        return {"obs": {"t": {"shape": [1], "type": "low_dim"}}, "action": {"shape": [1]}}

    def make_env(self, render=False):
        return KnownOutcomeEnv()


class StepEchoPolicy(torch.nn.Module):
    """Chunk from the observation at step t: actions t, t+1 (so the action executed at step t is t)."""

    shape_meta = KnownOutcomeTask().shape_meta()
    n_obs_steps, n_action_steps, horizon = 1, 2, 2
    device = torch.device("cpu")

    def predict_action(self, obs, generator=None):
        t = obs["t"][:, -1:, :]  # (B, 1, 1)
        chunk = torch.cat([t, t + 1], dim=1)
        return {"action": chunk, "action_pred": chunk}


def expected(seed: int, max_steps: int = 5) -> tuple[int, bool, list[float]]:
    length, success_step = OUTCOMES[seed]
    n = min(length, max_steps)
    rewards = [1.0 if k == success_step else 0.1 * k for k in range(1, n + 1)]
    return n, success_step is not None and success_step <= n, rewards


@pytest.mark.parametrize("n_envs", [1, 2, 3])
def test_rollouts_account_each_seed_exactly(n_envs):
    cfg = EvalConfig(n_episodes=5, seed=100, n_envs=n_envs, max_steps=5)
    rollouts = run_rollouts(StepEchoPolicy(), KnownOutcomeTask(), cfg, 5, 100)
    assert [r.seed for r in rollouts] == [100, 101, 102, 103, 104]  # the padding env (105) is not reported
    for r in rollouts:
        length, success, rewards = expected(r.seed)
        assert (r.length, r.success) == (length, success), r.seed
        np.testing.assert_allclose(r.rewards, rewards)  # nothing from the autoreset episode after the end
        np.testing.assert_array_equal(r.actions[:, 0], np.arange(length))  # action k executed at step k
        np.testing.assert_array_equal(
            r.low_dim_obs["t"][:, 0], np.arange(length + 1)
        )  # first obs + one per step


def test_report_counts_success_at_any_step(tmp_path):
    cfg = EvalConfig(n_episodes=5, seed=100, n_envs=2, max_steps=5)
    report = evaluate(StepEchoPolicy(), KnownOutcomeTask(), cfg, tmp_path)
    assert report["n_episodes"] == 5 and report["seeds"] == [100, 104]
    assert [e["success"] for e in report["episodes"]] == [True, False, True, False, True]
    assert report["success_rate"] == pytest.approx(3 / 5)
    # max reward per episode: 1.0 where it succeeded, else its last (largest) 0.1 * t
    assert [e["max_reward"] for e in report["episodes"]] == pytest.approx([1.0, 0.2, 1.0, 0.5, 1.0])
    assert report["mean_max_reward"] == pytest.approx(3.7 / 5)
    assert [e["length"] for e in report["episodes"]] == [4, 2, 3, 5, 2]
    assert json.loads((tmp_path / "report.json").read_text())["success_rate"] == report["success_rate"]


class FilmedEnv(KnownOutcomeEnv):
    """Counts its render calls (a shared list of env ids, one entry per call)."""

    calls: list[int] = []

    def render(self):
        FilmedEnv.calls.append(id(self))
        return np.zeros((8, 8, 3), dtype=np.uint8)


class FilmedTask(KnownOutcomeTask):
    fps = 30.0  # video_stride 3: one frame every third step

    def make_env(self, render=False):
        return FilmedEnv()

    def draw_chunk(self, frame, chunk):
        return frame


def test_videos_render_only_the_filmed_envs_every_stride_steps():
    FilmedEnv.calls = []
    cfg = EvalConfig(n_episodes=2, seed=103, n_envs=2, max_steps=5, n_videos=1)
    rollouts = run_rollouts(StepEchoPolicy(), FilmedTask(), cfg, 2, 103)
    # seed 103 runs 5 steps (filmed at steps 0 and 3), seed 104 is not filmed
    assert len(set(FilmedEnv.calls)) == 1 and len(FilmedEnv.calls) == 2
    assert len(rollouts[0].frames) == 2 and rollouts[1].frames is None
