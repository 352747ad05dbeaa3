"""ALOHA bimanual transfer-cube on gym-aloha's MuJoCo scene, with a scripted expert and no per-step renders.

The right arm picks up a red cube placed at random on the table and hands it to the left arm. The scene,
the 14-D joint-position action mapping and the reward are gym-aloha's own (`gym_aloha.tasks.sim`):
reward 1 = the right gripper touches the cube, 2 = it lifted it off the table, 3 = the left gripper touches
it, 4 = the left gripper touches it and the table does not (success, as gym-aloha's `is_success`).

Why not `gym_aloha.env.AlohaEnv` itself: its dm_control task renders three 480x640 cameras after every
step (~3 steps/s on a CPU). `AlohaTransferCubeEnv` drives the same `dm_control.mujoco.Physics` with the same
`before_step` / `physics.step(10)` / `get_reward` calls that dm_control's `control.Environment` makes, but
renders only what is asked for: nothing for state observations, the chosen cameras at a small size for
image observations, the top camera for `render()` (videos). Same seed, same actions -> same state as
gym-aloha (tests check it).

Action (14): per arm 6 absolute joint targets (waist, shoulder, elbow, forearm roll, wrist angle, wrist
rotate) then the gripper opening normalized to 0 (closed) .. 1 (open); left arm first.
Observations: `agent_pos` (14) = the joint positions in the same layout (gripper finger position
normalized), `cube_pose` (7) = the cube's position and quaternion (w, x, y, z) [state variant], or one RGB
image per camera (default: `top`) plus `agent_pos` [image variant].

Scripted expert (ACT's transfer-cube script, Zhao et al. 2023, re-implemented): end-effector waypoints for
both grippers in gym-aloha's mocap-controlled scene (`bimanual_viperx_end_effector_transfer_cube.xml`),
linearly interpolated; the joint positions that this end-effector rollout reaches (with the gripper
commands) become the joint targets replayed in the joint-controlled scene, which is what is recorded.
On MuJoCo 3 the mocap weld holds the gripper's orientation too loosely (the gripper sags and misses the
cube, 0/50); multiplying the weld's torque scale by 10 fixes it (50/50, see docs/research).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from diffpolicy.tasks.base import Rollout, Task, check_camera_options, prepare_headless_gl

prepare_headless_gl()  # before dm_control loads MuJoCo's GL (EGL by default; triton first)

from dm_control import mujoco as dm_mujoco  # noqa: E402
from gym_aloha.constants import (  # noqa: E402
    ASSETS_DIR,
    DT,
    PUPPET_GRIPPER_POSITION_CLOSE,
    START_ARM_POSE,
    normalize_puppet_gripper_position,
)
from gym_aloha.tasks.sim import TransferCubeTask  # noqa: E402
from gym_aloha.tasks.sim_end_effector import TransferCubeEndEffectorTask  # noqa: E402
from gym_aloha.utils import sample_box_pose  # noqa: E402

JOINT_XML = ASSETS_DIR / "bimanual_viperx_transfer_cube.xml"
MOCAP_XML = ASSETS_DIR / "bimanual_viperx_end_effector_transfer_cube.xml"
MAX_EPISODE_STEPS = 400  # 8 s at 50 Hz, as ACT's and LeRobot's transfer-cube episodes
SUCCESS_REWARD = 4
ACTION_DIM = 14
CUBE_JOINT = "red_box_joint"
CAMERAS = ("top", "angle", "front_close", "left_pillar", "right_pillar", "left_wrist", "right_wrist")
# The mocap weld's torque scale for the expert's end-effector scene (gym-aloha's XML leaves MuJoCo's 1).
WELD_TORQUESCALE = 10.0
# ACT's initial mocap poses (x, y, z, qw, qx, qy, qz): the gripper links' positions at START_ARM_POSE.
INIT_MOCAP_LEFT = np.array([-0.31718881, 0.5, 0.29525084, 1.0, 0.0, 0.0, 0.0])
INIT_MOCAP_RIGHT = np.array([0.31718881, 0.49999888, 0.29525084, 1.0, 0.0, 0.0, 0.0])


def cube_start_pose(seed: int) -> np.ndarray:
    """The cube's initial pose (7) for a seed: gym-aloha's `sample_box_pose`, so seeds mean the same there."""
    return np.asarray(sample_box_pose(seed), dtype=np.float64)


def joint_positions(physics: dm_mujoco.Physics) -> np.ndarray:
    """The 14-D `agent_pos`: arm joints and normalized gripper finger positions, left arm first."""
    return np.asarray(TransferCubeTask.get_qpos(physics), dtype=np.float64)


def _n_substeps(physics: dm_mujoco.Physics) -> int:
    """Physics steps per control step, as dm_control's control.Environment computes them."""
    return int(round(DT / physics.model.opt.timestep))


class AlohaTransferCubeEnv(gym.Env):
    """gym-aloha's transfer-cube scene as a gymnasium env that renders only on demand.

    obs_type "state": {"agent_pos": (14,), "cube_pose": (7,)} float32; "image": {camera: (H, W, 3) uint8 for
    each of `cameras`, "agent_pos": (14,)}. `reward` is gym-aloha's stage reward (0..4), `info["is_success"]`
    is reward == 4 and, with terminate_on_success (gym-aloha's behaviour), ends the episode. `render()`
    returns the top camera at render_shape (H, W). fast_render drops shadows, reflections and
    multisampling from every frame (see `render_camera`).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}

    def __init__(
        self,
        obs_type: str = "state",
        image_shape: tuple[int, int] = (96, 128),
        cameras: tuple[str, ...] = ("top",),
        render_shape: tuple[int, int] = (240, 320),
        terminate_on_success: bool = True,
        fast_render: bool = True,
    ) -> None:
        check_camera_options(obs_type, image_shape, cameras, render_shape, CAMERAS)
        self.obs_type = obs_type
        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        self.cameras = tuple(cameras)
        self.render_shape = (int(render_shape[0]), int(render_shape[1]))
        self.terminate_on_success = terminate_on_success
        self.render_mode = "rgb_array"
        self.physics = dm_mujoco.Physics.from_xml_path(str(JOINT_XML))
        self.fast_render = fast_render
        if fast_render:
            # Read when the GL context is made (at the first render): no 4x multisampling.
            self.physics.model.vis.quality.offsamples = 0
        self._cameras: dict[tuple[str, int, int], dm_mujoco.Camera] = {}
        self._task = TransferCubeTask()  # gym-aloha's action mapping (before_step) and reward
        self._n_substeps = _n_substeps(self.physics)
        self._cube_qpos = self.physics.model.jnt_qposadr[self.physics.model.name2id(CUBE_JOINT, "joint")]
        spaces: dict[str, gym.spaces.Space] = {}
        if obs_type == "state":
            spaces["agent_pos"] = gym.spaces.Box(-np.inf, np.inf, shape=(ACTION_DIM,), dtype=np.float32)
            spaces["cube_pose"] = gym.spaces.Box(-np.inf, np.inf, shape=(7,), dtype=np.float32)
        else:
            for cam in self.cameras:
                spaces[cam] = gym.spaces.Box(0, 255, shape=(*self.image_shape, 3), dtype=np.uint8)
            spaces["agent_pos"] = gym.spaces.Box(-np.inf, np.inf, shape=(ACTION_DIM,), dtype=np.float32)
        self.observation_space = gym.spaces.Dict(spaces)
        # gym-aloha's bounds: the actuators clamp to their ctrlrange; this box is only a loose description.
        self.action_space = gym.spaces.Box(-np.pi, np.pi, shape=(ACTION_DIM,), dtype=np.float32)
        self.reward_stage = 0

    def cube_pose(self) -> np.ndarray:
        """The cube's position and quaternion (7), float64."""
        return self.physics.data.qpos[self._cube_qpos : self._cube_qpos + 7].copy()

    def _obs(self) -> dict[str, np.ndarray]:
        obs = {"agent_pos": joint_positions(self.physics).astype(np.float32)}
        if self.obs_type == "state":
            obs["cube_pose"] = self.cube_pose().astype(np.float32)
        else:
            for cam in self.cameras:
                obs[cam] = self.render_camera(cam, self.image_shape)
        return obs

    def render_camera(self, camera: str, shape: tuple[int, int]) -> np.ndarray:
        """An RGB frame (H, W, 3) uint8 from a named camera. With fast_render, without shadows, reflections
        and multisampling: ~5 ms instead of ~90 ms at 96x128 on a CPU (Mesa llvmpipe)."""
        key = (camera, int(shape[0]), int(shape[1]))
        if key not in self._cameras:  # a Camera owns its mjvScene: build it once, not every frame
            self._cameras[key] = dm_mujoco.Camera(self.physics, key[1], key[2], camera_id=camera)
        flags = {"shadow": False, "reflection": False} if self.fast_render else None
        return self._cameras[key].render(render_flag_overrides=flags)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Arms at gym-aloha's START_ARM_POSE, the cube where gym-aloha puts it for this seed.

        options={"cube_pose": (7,)} places the cube explicitly instead.
        """
        super().reset(seed=seed)
        if options and "cube_pose" in options:
            cube = np.asarray(options["cube_pose"], dtype=np.float64).reshape(7)
        else:
            cube = cube_start_pose(seed if seed is not None else int(self.np_random.integers(2**31)))
        with self.physics.reset_context():
            self.physics.named.data.qpos[:16] = START_ARM_POSE
            np.copyto(self.physics.data.ctrl, START_ARM_POSE)
            self.physics.data.qpos[self._cube_qpos : self._cube_qpos + 7] = cube
        self.reward_stage = 0
        return self._obs(), {"is_success": False, "reward_stage": 0}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"aloha_transfer_cube expects a ({ACTION_DIM},) action, got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"aloha_transfer_cube received a non-finite action {action}")
        # What dm_control's control.Environment.step does for gym-aloha, minus get_observation's renders.
        self._task.before_step(action, self.physics)
        self.physics.step(self._n_substeps)
        self._task.after_step(self.physics)
        reward = int(self._task.get_reward(self.physics))
        self.reward_stage = reward
        success = reward == SUCCESS_REWARD
        info = {"is_success": success, "reward_stage": reward}
        return self._obs(), float(reward), bool(success and self.terminate_on_success), False, info

    def render(self) -> np.ndarray:
        return self.render_camera("top", self.render_shape)

    def close(self) -> None:
        self._cameras.clear()
        self.physics.free()


# --------------------------------------------------------------------------------------------------
# Scripted expert
# --------------------------------------------------------------------------------------------------


def _quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array(
        [
            w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
            w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
            w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
            w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
        ]
    )


def _axis_angle_quat(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    half = np.deg2rad(degrees) / 2
    return np.concatenate([[np.cos(half)], np.sin(half) * np.asarray(axis, dtype=np.float64)])


# A waypoint: (step, gripper position (3), gripper quaternion (4), gripper opening 0..1).
Waypoint = tuple[int, np.ndarray, np.ndarray, float]


def transfer_waypoints(cube_xyz: np.ndarray) -> tuple[list[Waypoint], list[Waypoint]]:
    """ACT's transfer-cube waypoints (left, right) for a cube at cube_xyz (its initial position).

    The right gripper, pitched 60 degrees, goes above the cube (step 90), down (130), closes (170), carries
    it to the meeting point (220) and opens (310); the left gripper, rolled 90 degrees, comes to the meeting
    point (260), closes (310) and pulls back (360).
    """
    cube_xyz = np.asarray(cube_xyz, dtype=np.float64)
    pick = _quat_mul(INIT_MOCAP_RIGHT[3:], _axis_angle_quat((0.0, 1.0, 0.0), -60.0))
    meet_left = _axis_angle_quat((1.0, 0.0, 0.0), 90.0)
    identity = np.array([1.0, 0.0, 0.0, 0.0])
    meet = np.array([0.0, 0.5, 0.25])
    left_meet = meet + [0.02, 0.0, -0.02]
    left_away = meet + [-0.1, 0.0, -0.02]
    left = [
        (0, INIT_MOCAP_LEFT[:3], INIT_MOCAP_LEFT[3:], 0.0),
        (100, left_away, meet_left, 1.0),
        (260, left_meet, meet_left, 1.0),
        (310, left_meet, meet_left, 0.0),
        (360, left_away, identity, 0.0),
        (400, left_away, identity, 0.0),
    ]
    right = [
        (0, INIT_MOCAP_RIGHT[:3], INIT_MOCAP_RIGHT[3:], 0.0),
        (90, cube_xyz + [0.0, 0.0, 0.08], pick, 1.0),
        (130, cube_xyz + [0.0, 0.0, -0.015], pick, 1.0),
        (170, cube_xyz + [0.0, 0.0, -0.015], pick, 0.0),
        (200, meet + [0.05, 0.0, 0.0], pick, 0.0),
        (220, meet, pick, 0.0),
        (310, meet, pick, 1.0),
        (360, meet + [0.1, 0.0, 0.0], pick, 1.0),
        (400, meet + [0.1, 0.0, 0.0], pick, 1.0),
    ]
    return left, right


def interpolate_waypoints(waypoints: list[Waypoint], step: int) -> np.ndarray:
    """(8,) position, quaternion and gripper at `step`, linear between waypoints (as ACT; MuJoCo normalizes
    the mocap quaternion); the last waypoint holds afterwards."""
    for (t0, p0, q0, g0), (t1, p1, q1, g1) in zip(waypoints[:-1], waypoints[1:], strict=True):
        if t0 <= step < t1:
            f = (step - t0) / (t1 - t0)
            return np.concatenate([p0 + (p1 - p0) * f, q0 + (q1 - q0) * f, [g0 + (g1 - g0) * f]])
    _, p, q, g = waypoints[-1]
    return np.concatenate([p, q, [g]])


class TransferCubeExpert:
    """ACT's scripted transfer: mocap end-effector rollout -> joint targets for the joint-controlled scene.

    `joint_targets(cube_pose)` runs the end-effector scene for `n_steps` control steps and returns the
    (n_steps, 14) joint targets: target t is the arm joint positions reached after t end-effector steps
    (t = 0: the start pose) with the gripper entries replaced by the normalized gripper commands, as
    ACT's record_sim_episodes.py does.
    """

    def __init__(self, n_steps: int = MAX_EPISODE_STEPS, weld_torquescale: float = WELD_TORQUESCALE) -> None:
        self.n_steps = n_steps
        self.physics = dm_mujoco.Physics.from_xml_path(str(MOCAP_XML))
        # eq_data of a weld: anchor (3), relative pose (7), torque scale (1).
        self.physics.model.eq_data[:, 10] = weld_torquescale
        self._task = TransferCubeEndEffectorTask()  # gym-aloha's mocap + gripper action mapping
        self._n_substeps = _n_substeps(self.physics)
        self._cube_qpos = self.physics.model.jnt_qposadr[self.physics.model.name2id(CUBE_JOINT, "joint")]

    def _reset(self, cube_pose: np.ndarray) -> None:
        p = self.physics
        with p.reset_context():
            p.named.data.qpos[:16] = START_ARM_POSE
            np.copyto(p.data.mocap_pos[0], INIT_MOCAP_LEFT[:3])
            np.copyto(p.data.mocap_quat[0], INIT_MOCAP_LEFT[3:])
            np.copyto(p.data.mocap_pos[1], INIT_MOCAP_RIGHT[:3])
            np.copyto(p.data.mocap_quat[1], INIT_MOCAP_RIGHT[3:])
            closed = PUPPET_GRIPPER_POSITION_CLOSE
            np.copyto(p.data.ctrl, [closed, -closed, closed, -closed])
            p.data.qpos[self._cube_qpos : self._cube_qpos + 7] = cube_pose

    def _targets_now(self) -> np.ndarray:
        q = joint_positions(self.physics)
        q[6] = normalize_puppet_gripper_position(self.physics.data.ctrl[0])
        q[13] = normalize_puppet_gripper_position(self.physics.data.ctrl[2])
        return q

    def joint_targets(self, cube_pose: np.ndarray) -> tuple[np.ndarray, int]:
        """(n_steps, 14) joint targets for a cube starting at cube_pose, and the end-effector rollout's
        best stage reward (4 when the mocap rollout itself transferred the cube)."""
        cube_pose = np.asarray(cube_pose, dtype=np.float64).reshape(7)
        self._reset(cube_pose)
        left, right = transfer_waypoints(cube_pose[:3])
        targets = [self._targets_now()]
        best = 0
        for t in range(self.n_steps - 1):
            action = np.concatenate([interpolate_waypoints(left, t), interpolate_waypoints(right, t)])
            self._task.before_step(action, self.physics)
            self.physics.step(self._n_substeps)
            targets.append(self._targets_now())
            best = max(best, int(self._task.get_reward(self.physics)))
        return np.stack(targets), best


# --------------------------------------------------------------------------------------------------
# Task
# --------------------------------------------------------------------------------------------------


class AlohaTransferCubeTask(Task):
    """Hand the cube from the right gripper to the left; 14-D joint targets; state or camera observations.

    kwargs: obs_type "state" | "image"; image_shape [H, W] of each camera image (default 96x128, a fifth
    of gym-aloha's 480x640); cameras (default ["top"]); render_shape [H, W] of video frames;
    terminate_on_success (gym-aloha's behaviour; default true); fast_render (default true: no shadows,
    reflections or multisampling, ~15x cheaper frames; false renders as gym-aloha does).
    """

    name = "aloha_transfer_cube"
    max_episode_steps = MAX_EPISODE_STEPS
    fps = 50.0
    absolute_actions = True  # joint-position targets
    robot_type = "aloha"

    def __init__(
        self,
        obs_type: str = "state",
        image_shape: tuple[int, int] | list[int] = (96, 128),
        cameras: tuple[str, ...] | list[str] = ("top",),
        render_shape: tuple[int, int] | list[int] = (240, 320),
        terminate_on_success: bool = True,
        fast_render: bool = True,
    ) -> None:
        image_shape, cameras, render_shape = tuple(image_shape), tuple(cameras), tuple(render_shape)
        check_camera_options(obs_type, image_shape, cameras, render_shape, CAMERAS)
        self.obs_type = obs_type
        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        self.cameras = cameras
        self.render_shape = (int(render_shape[0]), int(render_shape[1]))
        self.terminate_on_success = terminate_on_success
        self.fast_render = fast_render
        self._expert: TransferCubeExpert | None = None

    def shape_meta(self) -> dict[str, Any]:
        obs: dict[str, dict[str, Any]] = {}
        if self.obs_type == "state":
            obs["agent_pos"] = {"shape": [ACTION_DIM], "type": "low_dim"}
            obs["cube_pose"] = {"shape": [7], "type": "low_dim"}
        else:
            for cam in self.cameras:
                obs[cam] = {"shape": [3, *self.image_shape], "type": "rgb"}
            obs["agent_pos"] = {"shape": [ACTION_DIM], "type": "low_dim"}
        return {"obs": obs, "action": {"shape": [ACTION_DIM]}}

    def make_env(self, render: bool = False) -> gym.Env:
        """An AlohaTransferCubeEnv under a 400-step TimeLimit. It renders only inside `render()` and for
        image observations, so `render` changes nothing here."""
        env = AlohaTransferCubeEnv(
            self.obs_type,
            self.image_shape,
            self.cameras,
            self.render_shape,
            self.terminate_on_success,
            self.fast_render,
        )
        return gym.wrappers.TimeLimit(env, max_episode_steps=self.max_episode_steps)

    @property
    def expert(self) -> TransferCubeExpert:
        if self._expert is None:
            self._expert = TransferCubeExpert()
        return self._expert

    def collect_episode(self, seed: int) -> tuple[dict[str, np.ndarray], bool]:
        """One expert episode: the joint targets replayed in the task env, with the observation seen before
        each action. Also stored: `cube_pose`, `agent_vel` (joint velocities) and `reward` (stage, 0..4)."""
        targets, _ = self.expert.joint_targets(cube_start_pose(seed))
        env = self.make_env()
        obs, info = env.reset(seed=seed)
        inner: AlohaTransferCubeEnv = env.unwrapped
        keys = ["agent_pos", "cube_pose", "agent_vel", "action", "reward"]
        if self.obs_type == "image":
            keys += list(self.cameras)
        steps: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        success = False
        for action in targets:
            steps["agent_pos"].append(obs["agent_pos"])
            steps["cube_pose"].append(inner.cube_pose().astype(np.float32))
            steps["agent_vel"].append(TransferCubeTask.get_qvel(inner.physics).astype(np.float32))
            for cam in self.cameras if self.obs_type == "image" else ():
                steps[cam].append(obs[cam])
            steps["action"].append(action.astype(np.float32))
            obs, reward, terminated, truncated, info = env.step(action)
            steps["reward"].append(np.array([reward], dtype=np.float32))
            success |= bool(info["is_success"])
            if terminated or truncated:
                break
        env.close()
        return {k: np.stack(v) for k, v in steps.items()}, success

    def summarize(self, rollouts: list[Rollout], out_dir: Path) -> dict[str, Any]:
        """How far episodes got: the fraction that reached each reward stage, and success step stats."""
        if not rollouts:
            return {}
        best = np.array([r.max_reward for r in rollouts])
        names = {1: "touched", 2: "lifted", 3: "left_touched", 4: "transferred"}
        summary: dict[str, Any] = {f"reached_{names[s]}": float(np.mean(best >= s)) for s in names}
        success_steps = [r.length for r in rollouts if r.success]
        summary["mean_success_step"] = float(np.mean(success_steps)) if success_steps else None
        return summary
