"""lift: robosuite's Lift (a Panda arm under the OSC_POSE controller lifts a cube) with robomimic's keys.

Observations follow the user's robomimic spec (seed 001): `agentview_image` and `robot0_eye_in_hand_image`
(84x84 RGB, upright as robomimic stores them), `robot0_eef_pos` (3), `robot0_eef_quat` (4, xyzw) and
`robot0_gripper_qpos` (2); the state variant replaces the cameras by robomimic's low-dim `object` key
(robosuite's object-state: cube position, cube quaternion, gripper-to-cube vector; 10). Actions are
robosuite's OSC_POSE deltas in [-1, 1]^7: position (x 0.05 m), axis-angle rotation (x 0.5 rad), both in
the robot's base frame, and the gripper (-1 open, +1 close), at 20 Hz, the control of robomimic's Lift
demonstrations. Success is robosuite's own `Lift._check_success` (cube centre 4 cm above the table); an
episode ends there or after `max_episode_steps`.

The state variant never renders: robosuite is built with use_camera_obs=False and no offscreen renderer
unless videos are asked for (`make_env(render=True)`), which makes a step ~25% cheaper (see
docs/research/lift.md for the measured steps/s).

Dependencies (the `lift` extra). robosuite 1.5.2 pins `mink==0.0.5`, and mink 0.0.5 pins `numpy<2`, while
this project runs on numpy 2. mink serves only robosuite's whole-body IK for humanoids (imported inside
a try/except in robosuite/__init__.py); Lift with OSC_POSE never touches it, and robosuite itself runs
unchanged on numpy 2 (checked: numpy 2.4, mujoco 3.8). So robosuite is installed without its dependency
list (`pip install --no-deps robosuite==1.5.2`) and the `lift` extra lists the dependencies it really
uses (mujoco, numba, scipy, opencv, pillow, termcolor). Downgrading the whole project to numpy<2 for one
unused sub-dependency was the alternative, and was rejected.

Rendering is headless through EGL (Mesa's libEGL works without a GPU; scripts/headless-gl.sh installs it
where missing); set MUJOCO_GL=osmesa before importing this module to use OSMesa instead.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from scipy.spatial.transform import Rotation

from diffpolicy.tasks.base import Rollout, Task, prepare_headless_gl

prepare_headless_gl()  # before robosuite loads MuJoCo's GL (EGL by default; triton first)

# robosuite logs warnings at import about optional packages Lift never uses (mink, robosuite_models,
# a private macro file): keep them off the console while importing it.
_previous_disable = logging.root.manager.disable
logging.disable(logging.WARNING)
try:
    import robosuite  # noqa: E402
    from robosuite.controllers import load_composite_controller_config  # noqa: E402
finally:
    logging.disable(_previous_disable)
logging.getLogger("robosuite_logs").setLevel(logging.ERROR)  # per-make notes about unused controller parts

CAMERAS = ("agentview", "robot0_eye_in_hand")
IMAGE_SIZE = 84
CONTROL_FREQ = 20  # Hz, robomimic's Lift
MAX_EPISODE_STEPS = 200  # the expert needs 37-50 steps; a policy gets four times that
POS_SCALE = 0.05  # metres per unit of action (OSC_POSE output_max)
ROT_SCALE = 0.5  # radians per unit of action
LOW_DIM_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
OBJECT_KEY = "object"  # robomimic's name for robosuite's "object-state"
OBS_TYPES = ("state", "image")
# "fast": no multisampling, shadows or reflections (4x cheaper on CPU); "full": robosuite's own rendering
RENDER_QUALITIES = ("fast", "full")
# The gripper pointing straight down with its x axis along the world's x axis (the Panda's home pose,
# up to the initial joint noise); columns are the gripper's axes in the world frame.
_DOWN = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])


def _make_suite_env(cameras: bool, offscreen: bool, seed: int = 0) -> Any:
    """robosuite's Lift with the Panda under OSC_POSE; `cameras` adds the two 84x84 camera observations.

    hard_reset=False: a reset only re-samples the initial state (cube placement and joint noise) instead of
    recompiling the model and remaking the renderer each time; the cube's size (20-22 mm half-width) is
    drawn once, at construction, from `seed`.
    """
    controller = load_composite_controller_config(controller="BASIC", robot="Panda")
    return robosuite.make(
        "Lift",
        robots="Panda",
        controller_configs=controller,
        has_renderer=False,
        has_offscreen_renderer=cameras or offscreen,
        use_camera_obs=cameras,
        camera_names=list(CAMERAS),
        camera_heights=IMAGE_SIZE,
        camera_widths=IMAGE_SIZE,
        control_freq=CONTROL_FREQ,
        reward_shaping=False,
        ignore_done=True,  # the episode limit is the TimeLimit wrapper's
        hard_reset=False,
        seed=seed,
    )


def _fast_rendering(sim: Any) -> None:
    """Render without multisampling, shadows and reflections: 4x cheaper on a CPU (Mesa's llvmpipe).

    Measured here, two 84x84 cameras cost ~95 ms of CPU per step with robosuite's defaults (4x MSAA,
    shadows, a reflective table) and ~23-27 ms without; the scene is otherwise the same (no anti-aliasing, no
    shadows). MuJoCo reads the sample count when its render context is made, so that is remade in place.
    """
    import mujoco

    ctx = sim._render_context_offscreen
    sim.model._model.vis.quality.offsamples = 0
    ctx.gl_ctx.make_current()
    ctx.con.free()
    ctx._set_mujoco_context_and_buffers()
    ctx.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
    ctx.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0


class LiftEnv(gym.Env):
    """robosuite Lift as a gymnasium env with dict observations in robomimic's keys (float32 / uint8).

    obs_type "state": robot0_eef_pos, robot0_eef_quat, robot0_gripper_qpos and object; "image": the two
    cameras (84, 84, 3) uint8 and the three robot keys. `reset(seed=...)` re-seeds robosuite's generator,
    so a seed always gives the same cube placement and joint noise. Reward is 1 on success, else 0;
    success terminates. `render()` returns a render_size x render_size RGB frame from the agentview camera.
    render_quality "fast" (default) drops multisampling, shadows and reflections from every rendered image,
    cameras included; "full" keeps robosuite's rendering (use it to compare with robomimic's recordings).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_FREQ}

    def __init__(
        self,
        obs_type: str = "state",
        render: bool = False,
        render_size: int = 256,
        render_quality: str = "fast",
    ) -> None:
        if obs_type not in OBS_TYPES:
            raise ValueError(f"unknown obs_type '{obs_type}'; expected one of {OBS_TYPES}")
        if render_size < 16:
            raise ValueError(f"render_size must be >= 16, got {render_size}")
        if render_quality not in RENDER_QUALITIES:
            raise ValueError(f"unknown render_quality '{render_quality}'; expected one of {RENDER_QUALITIES}")
        self.obs_type = obs_type
        self.render_enabled = render
        self.render_size = render_size
        self.render_mode = "rgb_array" if render else None
        self.render_quality = render_quality
        self.suite_env = _make_suite_env(cameras=obs_type == "image", offscreen=render)
        if render_quality == "fast" and self.suite_env.sim._render_context_offscreen is not None:
            _fast_rendering(self.suite_env.sim)
        spaces: dict[str, gym.spaces.Space] = {
            "robot0_eef_pos": gym.spaces.Box(-np.inf, np.inf, shape=(3,), dtype=np.float32),
            "robot0_eef_quat": gym.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32),
            "robot0_gripper_qpos": gym.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32),
        }
        if obs_type == "state":
            spaces[OBJECT_KEY] = gym.spaces.Box(-np.inf, np.inf, shape=(10,), dtype=np.float32)
        else:
            for cam in CAMERAS:
                spaces[f"{cam}_image"] = gym.spaces.Box(
                    0, 255, shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8
                )
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(7,), dtype=np.float32)
        self.raw_obs: dict[str, np.ndarray] = {}

    def _task_obs(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.raw_obs = raw
        obs = {k: np.asarray(raw[k], dtype=np.float32) for k in LOW_DIM_KEYS}
        if self.obs_type == "state":
            obs[OBJECT_KEY] = np.asarray(raw["object-state"], dtype=np.float32)
        else:
            # robosuite returns OpenGL's bottom-up rows; robomimic (and every viewer) stores them top-down.
            for cam in CAMERAS:
                obs[f"{cam}_image"] = np.ascontiguousarray(raw[f"{cam}_image"][::-1])
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            # robosuite's placement sampler and robot share this Generator object: re-seed it in place.
            self.suite_env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        raw = self.suite_env.reset()
        return self._task_obs(raw), {"is_success": False}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (7,):
            raise ValueError(
                f"lift expects a 7-D action (dpos 3, drot 3, gripper 1), got shape {action.shape}"
            )
        if not np.all(np.isfinite(action)):
            raise ValueError(f"lift received a non-finite action {action}")
        raw, _, _, _ = self.suite_env.step(np.clip(action, -1.0, 1.0))
        success = bool(self.suite_env._check_success())
        return self._task_obs(raw), float(success), success, False, {"is_success": success}

    def render(self) -> np.ndarray:
        """An upright RGB frame from the agentview camera (needs make_env(render=True))."""
        if not self.render_enabled:
            raise RuntimeError("this LiftEnv was made without rendering; use LiftTask.make_env(render=True)")
        s = self.render_size
        frame = self.suite_env.sim.render(width=s, height=s, camera_name="agentview")
        return np.ascontiguousarray(frame[::-1])

    def cube_pos(self) -> np.ndarray:
        """The cube's centre (world frame, metres)."""
        return np.array(self.suite_env.sim.data.body_xpos[self.suite_env.cube_body_id])

    def cube_yaw(self) -> float:
        """The cube's rotation about the vertical (radians; the cube is upright on the table)."""
        xmat = np.array(self.suite_env.sim.data.body_xmat[self.suite_env.cube_body_id]).reshape(3, 3)
        return math.atan2(xmat[1, 0], xmat[0, 0])

    def table_height(self) -> float:
        return float(self.suite_env.model.mujoco_arena.table_offset[2])

    def close(self) -> None:
        self.suite_env.close()


# --------------------------------------------------------------------------------------------------
# Scripted expert
# --------------------------------------------------------------------------------------------------


@dataclass
class ExpertConfig:
    """Knobs of the scripted grasp; ranges are sampled per episode so demonstrations differ."""

    hover_height: tuple[float, float] = (0.06, 0.10)  # above the cube centre before descending (m)
    grasp_depth: tuple[float, float] = (-0.012, -0.004)  # eef target relative to the cube centre (m)
    xy_jitter: float = 0.004  # std of the grasp point's offset from the cube centre (m)
    yaw_jitter: float = 0.08  # std of the gripper's yaw offset from the cube's faces (rad)
    max_step: tuple[float, float] = (0.5, 0.9)  # translation action limit while moving (of 1 = 5 cm)
    lift_height: tuple[float, float] = (0.10, 0.15)  # lift target above the cube's start (m)
    close_steps: tuple[int, int] = (6, 10)  # steps spent closing the gripper before lifting
    gain: float = 1.0  # proportional gain from position error (units of 5 cm) to action
    rot_gain: float = 1.0  # ... from rotation error (units of 0.5 rad) to action
    action_noise: float = 0.05  # std of the Gaussian noise added to the translation actions


class LiftExpert:
    """Move above the cube while turning the gripper to its faces, descend, close, lift.

    A proportional controller on the end-effector pose drives the OSC_POSE deltas; the target orientation
    keeps the gripper pointing straight down with its yaw matched to the cube's (modulo 90 degrees, the
    cube's symmetry). Each episode samples its own hover height, grasp depth and offset, speed, closing
    time and lift height, and Gaussian noise perturbs the translation actions, so no two demonstrations
    are the same while the grasp stays reliable.
    """

    def __init__(self, seed: int, cfg: ExpertConfig | None = None) -> None:
        self.cfg = cfg = cfg or ExpertConfig()
        self.rng = np.random.default_rng(seed)
        u = self.rng.uniform
        self.hover = u(*cfg.hover_height)
        self.depth = u(*cfg.grasp_depth)
        self.offset = np.clip(self.rng.normal(0.0, cfg.xy_jitter, 2), -2 * cfg.xy_jitter, 2 * cfg.xy_jitter)
        self.yaw_offset = float(np.clip(self.rng.normal(0.0, cfg.yaw_jitter), -0.15, 0.15))
        self.max_step = u(*cfg.max_step)
        self.lift = u(*cfg.lift_height)
        self.close_steps = int(self.rng.integers(cfg.close_steps[0], cfg.close_steps[1] + 1))
        self.phase = "approach"
        self.phase_steps = 0
        self.target_rot: np.ndarray | None = None
        self.cube_start: np.ndarray | None = None

    def _target_rotation(self, env: LiftEnv, eef_rot: np.ndarray) -> np.ndarray:
        """Pointing down, yaw turned by the smallest angle that lines the fingers up with a cube face."""
        eef_yaw = math.atan2(eef_rot[1, 0], eef_rot[0, 0])
        turn = (env.cube_yaw() - eef_yaw + math.pi / 4) % (math.pi / 2) - math.pi / 4
        yaw = eef_yaw + turn + self.yaw_offset
        return Rotation.from_euler("z", yaw).as_matrix() @ _DOWN

    def act(self, env: LiftEnv) -> np.ndarray:
        """The next 7-D action for the env's current state (call once per step, in order)."""
        cfg = self.cfg
        obs = env.raw_obs
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        eef_rot = Rotation.from_quat(obs["robot0_eef_quat"]).as_matrix()
        cube = env.cube_pos()
        if self.target_rot is None:
            self.target_rot = self._target_rotation(env, eef_rot)
            self.cube_start = cube.copy()
        grasp_xy = cube[:2] + self.offset
        self.phase_steps += 1
        gripper, limit = -1.0, self.max_step
        if self.phase == "approach":
            target = np.array([*grasp_xy, cube[2] + self.hover])
            rot_err = Rotation.from_matrix(self.target_rot @ eef_rot.T).magnitude()
            if (np.linalg.norm(target - eef) < 0.01 and rot_err < 0.06) or self.phase_steps > 80:
                self._next("descend")
        if self.phase == "descend":
            target = np.array([*grasp_xy, cube[2] + self.depth])
            limit = min(limit, 0.5)  # slower near the cube
            reached = abs(target[2] - eef[2]) < 0.006 and np.linalg.norm(target[:2] - eef[:2]) < 0.006
            if reached or self.phase_steps > 60:
                self._next("grasp")
        if self.phase == "grasp":
            target, gripper = eef.copy(), 1.0
            if self.phase_steps > self.close_steps:
                self._next("lift")
        if self.phase == "lift":
            target = np.array([*eef[:2], self.cube_start[2] + self.lift])
            gripper = 1.0
        action = np.zeros(7)
        action[:3] = np.clip(cfg.gain * (target - eef) / POS_SCALE, -limit, limit)
        if self.phase != "grasp":
            action[:3] += self.rng.normal(0.0, cfg.action_noise, 3)
        rot_err = Rotation.from_matrix(self.target_rot @ eef_rot.T).as_rotvec()
        action[3:6] = np.clip(cfg.rot_gain * rot_err / ROT_SCALE, -0.5, 0.5)
        action[6] = gripper
        return np.clip(action, -1.0, 1.0)

    def _next(self, phase: str) -> None:
        self.phase, self.phase_steps = phase, 0


# --------------------------------------------------------------------------------------------------
# Task
# --------------------------------------------------------------------------------------------------


class LiftTask(Task):
    """Lift the cube; robot state + object state, or two 84x84 cameras + robot state; 7-D OSC deltas."""

    name = "lift"
    max_episode_steps = MAX_EPISODE_STEPS
    fps = float(CONTROL_FREQ)  # actions are OSC deltas: absolute_actions stays False

    def __init__(
        self,
        obs_type: str = "state",
        render_size: int = 256,
        max_episode_steps: int = MAX_EPISODE_STEPS,
        vector_mode: str = "async",
        render_quality: str = "fast",
    ) -> None:
        if obs_type not in OBS_TYPES:
            raise ValueError(f"unknown obs_type '{obs_type}'; expected one of {OBS_TYPES}")
        if max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        if vector_mode not in ("sync", "async"):
            raise ValueError(f"vector_mode must be 'sync' or 'async', got '{vector_mode}'")
        if render_quality not in RENDER_QUALITIES:
            raise ValueError(f"unknown render_quality '{render_quality}'; expected one of {RENDER_QUALITIES}")
        self.obs_type = obs_type
        self.render_size = render_size
        self.render_quality = render_quality
        self.max_episode_steps = max_episode_steps
        # A step costs ~0.1 CPU-second: evaluation envs are worth a process each where cores are free;
        # "sync" keeps evaluation in one process (a busy machine, CI).
        self.vector_mode = vector_mode

    def shape_meta(self) -> dict[str, Any]:
        obs: dict[str, dict[str, Any]] = {}
        if self.obs_type == "image":
            for cam in CAMERAS:
                obs[f"{cam}_image"] = {"shape": [3, IMAGE_SIZE, IMAGE_SIZE], "type": "rgb"}
        obs["robot0_eef_pos"] = {"shape": [3], "type": "low_dim"}
        obs["robot0_eef_quat"] = {"shape": [4], "type": "low_dim"}
        obs["robot0_gripper_qpos"] = {"shape": [2], "type": "low_dim"}
        if self.obs_type == "state":
            obs[OBJECT_KEY] = {"shape": [10], "type": "low_dim"}
        return {"obs": obs, "action": {"shape": [7]}}

    def make_env(self, render: bool = False) -> gym.Env:
        """A LiftEnv under a TimeLimit; render=True adds an offscreen renderer for video frames."""
        env = LiftEnv(
            self.obs_type, render=render, render_size=self.render_size, render_quality=self.render_quality
        )
        return gym.wrappers.TimeLimit(env, max_episode_steps=self.max_episode_steps)

    def collect_episode(self, seed: int) -> tuple[dict[str, np.ndarray], bool]:
        """One expert episode: the observation before each action, and the action.

        Besides the observation keys, `object` (cube pose) is stored in both variants and `cube_height`
        (cube centre above the table, m) for analysis.
        """
        env = LiftEnv(self.obs_type, render_quality=self.render_quality)
        try:
            expert = LiftExpert(seed)
            obs, _ = env.reset(seed=seed)
            keys = [*obs, "action", "cube_height"]
            if OBJECT_KEY not in keys:
                keys.append(OBJECT_KEY)
            steps: dict[str, list[np.ndarray]] = {k: [] for k in keys}
            success = False
            for _ in range(self.max_episode_steps):
                action = expert.act(env)
                for k, v in obs.items():
                    steps[k].append(v)
                if self.obs_type != "state":
                    steps[OBJECT_KEY].append(np.asarray(env.raw_obs["object-state"], dtype=np.float32))
                steps["cube_height"].append(
                    np.array([env.cube_pos()[2] - env.table_height()], dtype=np.float32)
                )
                steps["action"].append(action.astype(np.float32))
                obs, _, terminated, _, info = env.step(action)
                success = bool(info["is_success"])
                if terminated:
                    break
        finally:
            env.close()
        return {k: np.stack(v) for k, v in steps.items()}, success

    def summarize(self, rollouts: list[Rollout], out_dir: Path) -> dict[str, Any]:
        """Success-step statistics and how high the cube got (state variant: from the object key)."""
        if not rollouts:
            return {}
        success_steps = [r.length for r in rollouts if r.success]
        out: dict[str, Any] = {
            "mean_success_step": float(np.mean(success_steps)) if success_steps else None,
            "median_success_step": float(np.median(success_steps)) if success_steps else None,
        }
        heights = [r.low_dim_obs[OBJECT_KEY][:, 2].max() for r in rollouts if OBJECT_KEY in r.low_dim_obs]
        if heights:
            out["mean_max_cube_z"] = float(np.mean(heights))
        return out
