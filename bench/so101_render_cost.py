"""so101_grasp rendering cost: CPU ms per frame per camera and size, with and without the arm's visual
meshes, and per image-observation env step; or (--rollout STEPS) the env + video path of a validation
(run_rollouts: state obs, 10 envs, 4 videos, a network-free policy that holds HOME).

CPU time (time.process_time) counts every thread of the process, llvmpipe's included, so the numbers hold
on a machine shared with other jobs. docs/research/so101_grasp.md has the results.

    OMP_NUM_THREADS=1 python bench/so101_render_cost.py [--png PREFIX] [--frames 6]
    OMP_NUM_THREADS=1 python bench/so101_render_cost.py --rollout 30
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from diffpolicy.config import EvalConfig
from diffpolicy.evaluation import run_rollouts
from diffpolicy.tasks import make_task
from diffpolicy.tasks.so101_grasp import HOME, So101GraspEnv

SHAPES = ((96, 128), (240, 320))


def frames(n: int, png: str | None) -> None:
    env = So101GraspEnv(n_objects=3, obs_type="state")
    env.reset(seed=0)

    def cost(cam: str, shape: tuple[int, int]) -> float:
        env.render_camera(cam, shape)  # the GL context and scene are made on the first frame
        start = time.process_time()
        for _ in range(n):
            env.render_camera(cam, shape)
        return (time.process_time() - start) / n * 1000

    for arm in (True, False):
        env._scene_option.geomgroup[2] = int(arm)  # group 2: the arm's visual meshes
        for shape in SHAPES:
            row = " ".join(f"{c}={cost(c, shape):.0f}" for c in ("top", "side", "wrist"))
            print(f"arm meshes {'on ' if arm else 'off'} {shape}: CPU ms per frame {row}", flush=True)
    env.close()
    for shape in SHAPES:
        img = So101GraspEnv(n_objects=3, obs_type="image", image_shape=shape)
        img.reset(seed=0)
        img.step(HOME)
        start = time.process_time()
        for _ in range(n):
            obs, *_ = img.step(HOME)
        print(f"image obs step, top + side {shape}: {(time.process_time() - start) / n * 1000:.0f} CPU ms")
        if png:
            import imageio.v3 as iio

            iio.imwrite(f"{png}_{shape[0]}.png", np.concatenate([obs["top"], obs["side"]], axis=1))
        img.close()


def rollout(steps: int) -> None:
    task = make_task("so101_grasp", obs_type="state")

    class Hold(torch.nn.Module):
        """Chunks of HOME: no network, so only the envs and the videos cost."""

        shape_meta = task.shape_meta()
        n_obs_steps, n_action_steps, horizon = 1, 8, 16
        device = torch.device("cpu")

        def predict_action(self, obs, generator=None):
            chunk = torch.tensor(HOME, dtype=torch.float32).expand(obs["state"].shape[0], 16, 6).clone()
            return {"action": chunk[:, :8], "action_pred": chunk}

    cfg = EvalConfig(n_episodes=10, seed=1000, n_envs=10, max_steps=steps, n_videos=4)
    cpu, wall = time.process_time(), time.perf_counter()
    out = run_rollouts(Hold(), task, cfg, 10, 1000)
    print(
        f"{steps} steps x 10 envs: {time.process_time() - cpu:.1f} s CPU, {time.perf_counter() - wall:.1f} s "
        f"wall; {len(out[0].frames)} frames per video"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=6, help="frames timed per setting")
    parser.add_argument("--png", help="write the image observations to PREFIX_<height>.png")
    parser.add_argument("--rollout", type=int, help="time run_rollouts for this many steps instead")
    args = parser.parse_args()
    if args.rollout:
        rollout(args.rollout)
    else:
        frames(args.frames, args.png)


if __name__ == "__main__":
    main()
