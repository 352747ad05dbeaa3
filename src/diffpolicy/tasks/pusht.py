"""Push-T on the gym-pusht package, with an exact state save/restore and a sampling-based scripted expert.

The physics, coverage, reward and success test are gym-pusht's own (`gym_pusht.envs.PushTEnv`); this file
adds the observation keys of the original Diffusion Policy dataset (9 block keypoints, agent position,
96x96 image), a 300-step limit, and a planner that needs no human and no learned model.

Physics facts the planner relies on (gym-pusht defaults):
- the agent is a kinematic circle (radius 15) driven by a PD controller towards the absolute target
  (kp=100, kv=20: critically damped), 10 physics substeps of 0.01 s per control step;
- the block is a dynamic T with `space.damping = 0`, which zeroes its velocity before every substep: it
  moves only while the agent pushes it (quasi-static pushing), so a pose is a complete block state;
- the agent collides with the block only (kinematic bodies ignore the static walls); the block collides
  with the walls.
"""

from __future__ import annotations

import heapq
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from diffpolicy.tasks.base import Rollout, Task

# gym-pusht imports pygame at import time; without a display SDL must use its dummy video driver. Only set
# these when the user has not chosen otherwise.
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

from gym_pusht.envs.pusht import PushTEnv  # noqa: E402

WORKSPACE = 512.0
MAX_EPISODE_STEPS = 300
SUCCESS_COVERAGE = 0.95
AGENT_RADIUS = 15.0
GOAL_POSE = (256.0, 256.0, math.pi / 4)  # gym-pusht's goal_pose: x, y, angle

# The T's outline in its body frame (pymunk's body origin; the centre of gravity is at (0, 45)): the bar
# spans x in [-60, 60], y in [0, 30], the stem x in [-15, 15], y in [30, 120]. Vertices in order, so edge i
# runs from vertex i to vertex i+1 and `_OUTLINE_NORMALS[i]` is its outward normal.
_OUTLINE = np.array(
    [[-60, 0], [60, 0], [60, 30], [15, 30], [15, 120], [-15, 120], [-15, 30], [-60, 30]], dtype=np.float64
)
_OUTLINE_NORMALS = np.array(
    [[0, -1], [1, 0], [0, 1], [1, 0], [0, 1], [-1, 0], [0, 1], [-1, 0]], dtype=np.float64
)
_RECTS = np.array([[-60, 60, 0, 30], [-15, 15, 30, 120]], dtype=np.float64)  # x0, x1, y0, y1 of bar and stem

# The original dataset's 9 block keypoints in the body frame. Diffusion Policy's PymunkKeypointManager
# (create_from_pusht_env, seed 0) drew them by farthest-point sampling over the pixels of the T rendered at
# pose (256, 300, 0) plus a uniform [0, 1) jitter; `block_keypoints_local()` recomputes these values with
# gym-pusht's renderer (tests check that it still does).
BLOCK_KEYPOINTS_LOCAL = np.array(
    [
        [9.269786713763871, 90.04097352393619],
        [-60.983472364471474, -1.1867297607997276],
        [60.91275557727772, -1.3933642242328201],
        [-0.2705034390160016, 25.54362499146542],
        [-14.064927576212233, 122.81585355412153],
        [39.002738500170146, 32.857404276587566],
        [-39.966414424694534, 32.729655446429945],
        [-16.82434437939744, 62.86317892234989],
        [23.54146122024909, -1.7002881094626152],
    ]
)


def _rotation(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def to_world(points: np.ndarray, pose: tuple[float, float, float] | np.ndarray) -> np.ndarray:
    """Body-frame points (..., 2) of a T at pose (x, y, angle) in workspace coordinates."""
    return np.asarray(points) @ _rotation(pose[2]).T + np.array([pose[0], pose[1]])


def to_local(points: np.ndarray, pose: tuple[float, float, float] | np.ndarray) -> np.ndarray:
    """Workspace points (..., 2) in the body frame of a T at pose (x, y, angle)."""
    return (np.asarray(points) - np.array([pose[0], pose[1]])) @ _rotation(pose[2])


_GOAL_OUTLINE = to_world(_OUTLINE, GOAL_POSE)


def goal_distance(pose: tuple[float, float, float] | np.ndarray) -> float:
    """Mean distance (px) of the T's 8 outline vertices to where they are at the goal pose.

    Success (coverage > 0.95) needs this below roughly 2 px.
    """
    return float(np.sqrt(((to_world(_OUTLINE, pose) - _GOAL_OUTLINE) ** 2).sum(-1)).mean())


def tee_distance(local_points: np.ndarray) -> np.ndarray:
    """Distance of body-frame points (..., 2) to the T (0 inside)."""
    p = np.asarray(local_points)[..., None, :]  # (..., 1, 2) against the two rectangles
    dx = np.maximum(np.maximum(_RECTS[:, 0] - p[..., 0], p[..., 0] - _RECTS[:, 1]), 0.0)
    dy = np.maximum(np.maximum(_RECTS[:, 2] - p[..., 1], p[..., 1] - _RECTS[:, 3]), 0.0)
    return np.sqrt(dx * dx + dy * dy).min(-1)


def block_keypoints_local(n_keypoints: int = 9, seed: int = 0) -> np.ndarray:
    """Recompute the original dataset's block keypoints (farthest-point sampling of the rendered T)."""
    import pygame
    import pymunk
    from gym_pusht.envs.pymunk_override import DrawOptions

    rng = np.random.default_rng(seed)
    space = pymunk.Space()
    body, _ = PushTEnv.add_tee(space, (256, 300), 0)
    screen = pygame.Surface((512, 512))
    screen.fill(pygame.Color("white"))
    space.debug_draw(DrawOptions(screen))
    img = np.uint8(pygame.surfarray.array3d(screen).transpose(1, 0, 2))
    mask = (img != 255).any(-1)
    xy = np.moveaxis(np.indices((512, 512)), 0, -1)[:, :, ::-1]  # (row, col) -> (x, y)
    points = (xy - np.array(body.position))[mask].astype(np.float64)  # pose angle is 0: a translation
    chosen = [points[rng.choice(len(points))]]
    for _ in range(n_keypoints - 1):
        dist = np.linalg.norm(points[:, None] - np.array(chosen)[None], axis=-1).min(1)
        chosen.append(points[np.argmax(dist)])
    return np.array(chosen) + rng.uniform(0, 1, size=(n_keypoints, 2))


# --------------------------------------------------------------------------------------------------
# Exact state save / restore
# --------------------------------------------------------------------------------------------------

STATE_DIM = 10  # agent x, y, vx, vy; block x, y, angle, vx, vy, angular velocity


def get_state(env: gym.Env) -> np.ndarray:
    """The full physical state (float64, STATE_DIM): agent position and velocity, block pose and velocities.

    Block x, y is pymunk's body position (the T's origin, as in gym-pusht's observations), not its CoG.
    """
    e = env.unwrapped
    a, b = e.agent, e.block
    return np.array(
        [*a.position, *a.velocity, *b.position, b.angle, *b.velocity, b.angular_velocity], dtype=np.float64
    )


def _set_bodies(e: PushTEnv, state: np.ndarray) -> None:
    a, b = e.agent, e.block
    a.position = (float(state[0]), float(state[1]))
    a.velocity = (float(state[2]), float(state[3]))
    # The T's centre of gravity is not its origin and pymunk rotates a body about its CoG, so setting the
    # angle after the position would shift the position: angle first, then position.
    b.angle = float(state[6])
    b.position = (float(state[4]), float(state[5]))
    b.velocity = (float(state[7]), float(state[8]))
    b.angular_velocity = float(state[9])
    e.space.reindex_shapes_for_body(a)
    e.space.reindex_shapes_for_body(b)


def set_state(env: gym.Env, state: np.ndarray) -> None:
    """Restore a `get_state` vector exactly: the same actions then give the same trajectory, bit for bit.

    Setting the bodies is not enough on its own: pymunk keeps the contact impulses of recent steps to
    warm-start its solver, and the spatial index remembers its history, so the space is rebuilt first
    (gym-pusht's own `_setup`, as at reset) and then the bodies are set. Costs ~0.15 ms.
    """
    e = env.unwrapped
    e._setup()
    _set_bodies(e, np.asarray(state, dtype=np.float64))


def physics_step(env: gym.Env, target: np.ndarray) -> None:
    """One control step of gym-pusht's PD controller and physics, without coverage or observation.

    The arithmetic is PushTEnv.step's, operation for operation (tests check the two agree bitwise), at a
    quarter of its cost; the planner simulates candidate pushes with it.
    """
    e = env.unwrapped
    tx, ty = float(target[0]), float(target[1])
    agent, space, dt, kp, kv = e.agent, e.space, e.dt, e.k_p, e.k_v
    for _ in range(int(1 / (dt * e.control_hz))):
        px, py = agent.position
        vx, vy = agent.velocity
        agent.velocity = (
            vx + (kp * (tx - px) + kv * (0 - vx)) * dt,
            vy + (kp * (ty - py) + kv * (0 - vy)) * dt,
        )
        space.step(dt)


def block_pose(env: gym.Env) -> tuple[float, float, float]:
    b = env.unwrapped.block
    x, y = b.position
    return (x, y, b.angle)


def count_contacts(env: gym.Env) -> int:
    """Number of contact points between the agent and the block right now (0, 1 or 2)."""
    e = env.unwrapped
    agent_shape = next(iter(e.agent.shapes))
    return sum(len(agent_shape.shapes_collide(s).points) for s in e.block.shapes)


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------


class PushTTaskEnv(PushTEnv):
    """gym-pusht's PushTEnv with dict observations in the original dataset's keys.

    obs_type "state": keypoint (9, 2) and agent_pos (2,), float32, in workspace pixels; "image": img
    (96, 96, 3) uint8 and agent_pos. Actions are absolute agent targets in [0, 512]^2, clipped to it;
    a non-finite action raises ValueError. `render()` returns a render_size x render_size RGB frame.
    """

    def __init__(self, obs_type: str = "state", render_size: int = 256) -> None:
        if obs_type not in ("state", "image"):
            raise ValueError(f"unknown obs_type '{obs_type}'; expected 'state' or 'image'")
        super().__init__(
            obs_type="state" if obs_type == "state" else "pixels_agent_pos",
            render_mode="rgb_array",
            visualization_width=render_size,
            visualization_height=render_size,
        )
        self.task_obs_type = obs_type
        self.action_space = gym.spaces.Box(0.0, WORKSPACE, shape=(2,), dtype=np.float32)
        spaces: dict[str, gym.spaces.Space] = {}
        if obs_type == "state":
            spaces["keypoint"] = gym.spaces.Box(0.0, WORKSPACE, shape=(9, 2), dtype=np.float32)
        else:
            spaces["img"] = gym.spaces.Box(0, 255, shape=(96, 96, 3), dtype=np.uint8)
        spaces["agent_pos"] = gym.spaces.Box(0.0, WORKSPACE, shape=(2,), dtype=np.float32)
        self.observation_space = gym.spaces.Dict(spaces)

    def keypoints(self) -> np.ndarray:
        """The block's 9 keypoints (9, 2) in workspace pixels, as in the original dataset."""
        return to_world(BLOCK_KEYPOINTS_LOCAL, block_pose(self)).astype(np.float32)

    def _task_obs(self, raw: Any) -> dict[str, np.ndarray]:
        if self.task_obs_type == "state":
            return {"keypoint": self.keypoints(), "agent_pos": np.asarray(raw[:2], dtype=np.float32)}
        return {"img": raw["pixels"], "agent_pos": np.asarray(raw["agent_pos"], dtype=np.float32)}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        raw, info = super().reset(seed=seed, options=options)
        info["coverage"] = self._get_coverage()
        return self._task_obs(raw), info

    def step(self, action):
        action = np.asarray(action, dtype=np.float32).reshape(2)
        if not np.all(np.isfinite(action)):
            raise ValueError(f"pusht received a non-finite action {action}")
        action = np.clip(action, 0.0, WORKSPACE).astype(np.float64)
        raw, reward, terminated, truncated, info = super().step(action)
        info["is_success"] = bool(info["is_success"])
        return self._task_obs(raw), float(reward), bool(terminated), truncated, info


# --------------------------------------------------------------------------------------------------
# Scripted expert
# --------------------------------------------------------------------------------------------------


@dataclass
class ExpertConfig:
    """Knobs of the push planner (pixels and control steps of 0.1 s)."""

    n_contacts: int = 16  # contact points sampled on the T's outline per plan
    push_angles: tuple[float, ...] = (-0.45, 0.0, 0.45)  # push direction relative to the inward normal (rad)
    max_push_steps: int = 8  # longest push considered; every shorter one is scored too
    push_speed: tuple[float, float] = (2.5, 10.0)  # target speed (px/step) near the goal / far from it
    approach_speed: float = 20.0  # target speed along the approach path
    final_approach_speed: float = 6.0  # ... on its last leg, straight towards the contact
    contact_gap: float = 1.5  # agent surface to block at the start of a push
    standoff: float = 18.0  # the last approach leg starts this far out along the contact normal
    path_margin: float = 8.0  # agent surface to block clearance kept on the approach path
    waypoint_margin: float = 14.0  # clearance of the detour waypoints around the T
    retreat_steps: int = 2  # a push is scored after the target backs off for this many steps ...
    retreat_distance: float = 12.0  # ... this far behind the agent, which stops it at once
    step_cost: tuple[float, float] = (0.02, 0.003)  # per-step cost: constant + fraction of goal distance


_SOLVED = -1e6  # score of a plan that reaches success (plus its length: the shortest one wins)


@dataclass
class _Plan:
    targets: list[np.ndarray]
    score: float
    success: bool
    direction: np.ndarray | None = None  # the push direction (world frame), if the plan pushes


class PushTExpert:
    """Greedy planner over sampled pushes, simulated exactly and scored by keypoint distance to the goal.

    Each plan samples contact points on the T's outline; for each it routes the agent around the block to
    a point just outside the contact (shortest path over waypoints that keep clear of the T) and simulates
    the approach once; from there it simulates pushes in a few directions inside the friction cone, scoring
    every push length k = 1..max_push_steps after a short retreat. Score: mean outline-vertex distance to
    the goal plus a small per-step cost; any prefix that reaches coverage > 0.95 wins outright (shortest
    first). When the agent already touches the T, pushing on from where it stands is a candidate too. The
    best candidate's approach and push are executed (its retreat is only scored: the next plan decides
    whether to back off or push on) and the expert replans. Push speed shrinks with the distance to the
    goal, so the endgame makes small, slow, precise pushes. Targets move at most ~25 px per step and stay
    within ~50 px of the agent, like a teleoperator's.

    The planner simulates in its own PushTEnv and, between candidates, only sets the bodies (not the exact
    `set_state`): pymunk's stale contact cache then shifts predictions by ~0.01 px, far below the 2 px
    success tolerance, for a third of the planning time.
    """

    def __init__(self, seed: int = 0, config: ExpertConfig | None = None) -> None:
        self.cfg = config or ExpertConfig()
        self.rng = np.random.default_rng(seed)
        self.sim = PushTEnv(obs_type="state")
        self.sim.reset(seed=0)
        self.queue: list[np.ndarray] = []
        self.last_direction: np.ndarray | None = None
        self.n_plans = 0

    def reset(self) -> None:
        self.queue = []
        self.last_direction = None

    def act(self, env: gym.Env) -> np.ndarray:
        """The next absolute target for the agent in `env` (replans when the current plan is used up)."""
        if not self.queue:
            plan = self.plan(get_state(env))
            self.queue, self.last_direction = plan.targets, plan.direction
            self.n_plans += 1
        return self.queue.pop(0)

    # -- planning -----------------------------------------------------------------------------------

    def plan(self, state: np.ndarray) -> _Plan:
        cfg = self.cfg
        state = np.asarray(state, dtype=np.float64)
        set_state(self.sim, state)
        pose = (state[4], state[5], state[6])
        dist0 = goal_distance(pose)
        speed = float(np.clip(0.35 * dist0, *cfg.push_speed))
        step_cost = cfg.step_cost[0] + cfg.step_cost[1] * dist0
        router = _Router(pose, state[:2], cfg)
        # Fallback when no push can be routed (rare: the agent boxed in by the T and a wall): step away from
        # the block; the next plan samples new contacts from there.
        escape = to_world(_escape_point(to_local(state[:2], pose), 20.0), pose)
        best = _Plan([escape], math.inf, False)
        for edge, t in self._sample_contacts():
            c = _OUTLINE[edge] + t * (_OUTLINE[(edge + 1) % 8] - _OUTLINE[edge])
            n = _OUTLINE_NORMALS[edge]
            p0 = c + n * (AGENT_RADIUS + cfg.contact_gap)
            if tee_distance(p0) < AGENT_RADIUS + cfg.contact_gap - 0.5:
                continue  # the agent would overlap another part of the T (near a concave corner)
            path = router.route(p0, n)
            if path is None:
                continue
            approach = _discretize(to_world(path, pose), cfg)
            _set_bodies(self.sim, state)
            done = self._rollout(approach)
            if done is not None:
                best = min(best, done, key=lambda p: p.score)
                continue
            after_approach = get_state(self.sim)
            p0_world = to_world(p0, pose)
            n_world = _rotation(pose[2]) @ n
            for angle in cfg.push_angles:
                d = -(_rotation(angle) @ n_world)
                _set_bodies(self.sim, after_approach)
                plan = self._push(approach, p0_world, d, speed, step_cost)
                best = min(best, plan, key=lambda p: p.score)
        for d in self._continuations(state, pose):
            # Keep pushing from where the agent is, without the detour of a new approach.
            _set_bodies(self.sim, state)
            plan = self._push([], state[:2], d, speed, step_cost)
            best = min(best, plan, key=lambda p: p.score)
        best.targets = [np.clip(t, 0, WORKSPACE).astype(np.float32) for t in best.targets]
        return best

    def _sample_contacts(self) -> list[tuple[int, float]]:
        """Contact points (edge index, fraction along it), uniform over the outline's length."""
        lengths = np.linalg.norm(np.roll(_OUTLINE, -1, axis=0) - _OUTLINE, axis=1)
        s = self.rng.uniform(0, lengths.sum(), size=self.cfg.n_contacts)
        edges = np.searchsorted(np.cumsum(lengths), s, side="right")
        frac = (s - np.concatenate([[0.0], np.cumsum(lengths)])[edges]) / lengths[edges]
        return [(int(e), float(np.clip(f, 0.05, 0.95))) for e, f in zip(edges, frac, strict=True)]

    def _continuations(self, state: np.ndarray, pose: tuple[float, float, float]) -> list[np.ndarray]:
        """Push directions from the agent's current position when it touches (or nearly touches) the T."""
        local = to_local(state[:2], pose)
        if tee_distance(local) > AGENT_RADIUS + 4.0:
            return []
        inward = -_escape_direction(local)
        rot = _rotation(pose[2])
        dirs = [rot @ (_rotation(a) @ inward) for a in self.cfg.push_angles]
        if self.last_direction is not None:
            dirs += [_rotation(a) @ self.last_direction for a in (-0.15, 0.0, 0.15)]
        return dirs

    def _rollout(self, targets: list[np.ndarray]) -> _Plan | None:
        """Simulate targets from the sim's state; a _Plan up to there if coverage > 0.95 is reached."""
        for i, target in enumerate(targets):
            physics_step(self.sim, target)
            if self._solved():
                return _Plan(targets[: i + 1], _SOLVED + i + 1, True)
        return None

    def _solved(self) -> bool:
        # The keypoint distance is a cheap filter; the coverage (shapely) decides.
        return goal_distance(block_pose(self.sim)) < 4.0 and self.sim._get_coverage() > SUCCESS_COVERAGE

    def _push(
        self, approach: list[np.ndarray], p0: np.ndarray, d: np.ndarray, speed: float, step_cost: float
    ) -> _Plan:
        """Push from p0 along d; score every length after a retreat; the best (or first solving) plan."""
        cfg = self.cfg
        best = _Plan(approach, math.inf, False)
        pushes: list[np.ndarray] = []
        for k in range(1, cfg.max_push_steps + 1):
            target = p0 + d * speed * k
            pushes.append(target)
            physics_step(self.sim, target)
            if self._solved():
                return _Plan(approach + pushes, _SOLVED + len(approach) + k, True)
            mid = get_state(self.sim)
            # Retreat: targets behind the agent stop it at once (the PD target is otherwise ahead of the
            # lagging agent and would keep pushing).
            retreat = []
            for _ in range(cfg.retreat_steps):
                r = np.array(self.sim.agent.position) - d * cfg.retreat_distance
                retreat.append(r)
                physics_step(self.sim, r)
                if self._solved():
                    return _Plan(
                        approach + pushes + retreat, _SOLVED + len(approach) + k + len(retreat), True
                    )
            n_steps = len(approach) + k + len(retreat)
            score = goal_distance(block_pose(self.sim)) + step_cost * n_steps
            if score < best.score:
                # The retreat is only scored: the next plan decides whether to back off or push on.
                best = _Plan(approach + pushes, score, False, d)
            _set_bodies(self.sim, mid)
        return best


class _Router:
    """Collision-free approach paths around the T, in its body frame.

    Nodes: the agent (with a retreat point when it is close to the block), detour waypoints around the T's
    convex corners, edge middles and the two notches under the bar; edges: segments that keep the agent's
    surface `path_margin` from the block. Dijkstra finds the shortest route to a stand-off point outside
    the contact, from which the agent moves straight in.
    """

    def __init__(self, pose: tuple[float, float, float], agent: np.ndarray, cfg: ExpertConfig) -> None:
        self.pose, self.cfg = pose, cfg
        self.clear = AGENT_RADIUS + cfg.path_margin  # centre-to-block distance kept on the path
        w = AGENT_RADIUS + cfg.waypoint_margin
        hull = np.array([[-60, 0], [60, 0], [60, 30], [15, 120], [-15, 120], [-60, 30]], dtype=np.float64)
        nodes = [
            hull[i] + w * _corner_offset(hull[i - 1], hull[i], hull[(i + 1) % len(hull)]) for i in range(6)
        ]
        nodes += [
            (hull[i] + hull[(i + 1) % 6]) / 2 + w * _edge_normal(hull[i], hull[(i + 1) % 6]) for i in range(6)
        ]
        nodes += [np.array([15 + w, 30 + w]), np.array([-15 - w, 30 + w])]
        start = to_local(agent, pose)
        self.nodes = [start]
        self.start_fixed = False
        start_dist = float(tee_distance(start))
        if start_dist < self.clear:
            # Too close to the block to go anywhere directly: first back away from it, in the direction
            # that gains most clearance (a notch under the bar can have the T on two sides).
            self.nodes.append(_escape_point(start, self.clear - start_dist + 2.0))
            self.start_fixed = True
        ok = [_in_workspace(to_world(p, pose)) and tee_distance(p) >= self.clear - 1e-6 for p in nodes]
        self.nodes += [p for p, keep in zip(nodes, ok, strict=True) if keep]
        self.node_dist = tee_distance(np.array(self.nodes))
        m = len(self.nodes)
        self.adj = np.full((m, m), math.inf)
        for i in range(m):
            for j in range(i + 1, m):
                # The agent's only way out of a tight spot is its retreat point.
                ok_ij = j == 1 if i == 0 and self.start_fixed else self._segment_clear(i, self.nodes[j])
                if ok_ij:
                    self.adj[i, j] = self.adj[j, i] = float(np.linalg.norm(self.nodes[i] - self.nodes[j]))

    def _segment_clear(self, i: int, b: np.ndarray, clear: float | None = None) -> bool:
        """Whether the segment from node i to b keeps `clear` from the T; from a node that is closer than
        that (the retreat point), it may not get any closer than the node already is."""
        a = self.nodes[i]
        limit = min(self.clear if clear is None else clear, float(self.node_dist[i]))
        n = max(2, int(np.linalg.norm(b - a) / 3.0) + 1)
        pts = a + np.linspace(0, 1, n)[:, None] * (b - a)
        return bool(tee_distance(pts).min() >= limit - 1e-6)

    def route(self, p0: np.ndarray, normal: np.ndarray) -> np.ndarray | None:
        """Body-frame path (K, 2) from the agent to p0, ending with a straight leg along -normal."""
        cfg = self.cfg
        start = self.nodes[0]
        if np.linalg.norm(start - p0) < 3.0:
            return np.array([start, p0])  # already there: push from where the agent stands
        stand = p0 + normal * cfg.standoff
        if tee_distance(stand) < self.clear - 1e-6 or not _in_workspace(to_world(stand, self.pose)):
            return None
        n_final = max(2, int(cfg.standoff / 3.0) + 1)
        final_leg = stand + np.linspace(0, 1, n_final)[:, None] * (p0 - stand)
        if tee_distance(final_leg).min() < AGENT_RADIUS + cfg.contact_gap - 0.5:
            return None
        m = len(self.nodes)
        last = np.array(
            [self._segment_clear(i, stand) and not (i == 0 and self.start_fixed) for i in range(m)]
        )
        dist_to_stand = np.where(last, [np.linalg.norm(p - stand) for p in self.nodes], math.inf)
        path = _dijkstra(self.adj, dist_to_stand)
        if path is None:
            return None
        return np.array([self.nodes[i] for i in path] + [stand, p0])


def _dijkstra(adj: np.ndarray, to_goal: np.ndarray) -> list[int] | None:
    """Shortest path from node 0 to a virtual goal reachable from node i at cost to_goal[i]."""
    m = len(adj)
    dist = np.full(m + 1, math.inf)
    prev = np.full(m + 1, -1)
    dist[0] = 0.0
    heap = [(0.0, 0)]
    while heap:
        du, u = heapq.heappop(heap)
        if du > dist[u]:
            continue
        if u == m:
            break
        costs = np.append(adj[u], to_goal[u])
        for v in np.nonzero(np.isfinite(costs))[0]:
            nd = du + costs[v]
            if nd < dist[v]:
                dist[v], prev[v] = nd, u
                heapq.heappush(heap, (nd, int(v)))
    if not np.isfinite(dist[m]):
        return None
    path, u = [], prev[m]
    while u != -1:
        path.append(int(u))
        u = prev[u]
    return path[::-1]


def _edge_normal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Outward normal of edge a->b of the convex hull listed above (clockwise on screen, y down)."""
    e = (b - a) / np.linalg.norm(b - a)
    return np.array([e[1], -e[0]])


def _corner_offset(prev: np.ndarray, v: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """Offset of a convex corner that puts a point at unit distance from both adjacent edges' lines."""
    n1, n2 = _edge_normal(prev, v), _edge_normal(v, nxt)
    return (n1 + n2) / (1.0 + float(n1 @ n2))


def _escape_point(p: np.ndarray, length: float, n_directions: int = 16) -> np.ndarray:
    """The point at `length` from body-frame point p (in one of n directions) farthest from the T."""
    angles = np.arange(n_directions) * (2 * math.pi / n_directions)
    candidates = p + max(length, 4.0) * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return candidates[int(np.argmax(tee_distance(candidates)))]


def _escape_direction(p: np.ndarray) -> np.ndarray:
    """Unit direction in which a body-frame point near the T gets away from it fastest."""
    eps = 0.5
    grad = np.array(
        [
            tee_distance(p + [eps, 0]) - tee_distance(p - [eps, 0]),
            tee_distance(p + [0, eps]) - tee_distance(p - [0, eps]),
        ]
    )
    if np.linalg.norm(grad) < 1e-6:  # inside the T: away from its centre of gravity
        grad = p - np.array([0.0, 45.0])
    norm = np.linalg.norm(grad)
    return grad / norm if norm > 1e-9 else np.array([0.0, -1.0])


def _in_workspace(p: np.ndarray, margin: float = 2.0) -> bool:
    return bool(np.all(p >= margin) and np.all(p <= WORKSPACE - margin))


def _discretize(path: np.ndarray, cfg: ExpertConfig) -> list[np.ndarray]:
    """Targets moving along a world-frame path at the approach speed; slower on its last leg."""
    targets: list[np.ndarray] = []
    for i in range(1, len(path)):
        speed = cfg.final_approach_speed if i == len(path) - 1 else cfg.approach_speed
        seg = path[i] - path[i - 1]
        n = max(1, math.ceil(float(np.linalg.norm(seg)) / speed))
        targets += [path[i - 1] + seg * (j / n) for j in range(1, n + 1)]
    return targets


# --------------------------------------------------------------------------------------------------
# Task
# --------------------------------------------------------------------------------------------------


class PushTTask(Task):
    """Push the T onto the goal pose; state (keypoints) or image observations, absolute-target actions."""

    name = "pusht"
    max_episode_steps = MAX_EPISODE_STEPS
    fps = 10.0
    absolute_actions = True  # the agent's target position
    vector_mode = "async"  # an env step costs ~0.3 ms (state) to ~3 ms (image): worth a process each

    def __init__(self, obs_type: str = "state", render_size: int = 256) -> None:
        if obs_type not in ("state", "image"):
            raise ValueError(f"unknown obs_type '{obs_type}'; expected 'state' or 'image'")
        self.obs_type = obs_type
        self.render_size = render_size

    def description(self) -> str:
        return "Push the T onto the goal"

    def shape_meta(self) -> dict[str, Any]:
        if self.obs_type == "state":
            obs = {"keypoint": {"shape": [9, 2], "type": "low_dim"}}
        else:
            obs = {"img": {"shape": [3, 96, 96], "type": "rgb"}}
        obs["agent_pos"] = {"shape": [2], "type": "low_dim"}
        return {"obs": obs, "action": {"shape": [2]}}

    def make_env(self, render: bool = False) -> gym.Env:
        """A PushTTaskEnv under a 300-step TimeLimit (render frames are always available)."""
        env = PushTTaskEnv(self.obs_type, self.render_size)
        return gym.wrappers.TimeLimit(env, max_episode_steps=self.max_episode_steps)

    def collect_episode(self, seed: int) -> tuple[dict[str, np.ndarray], bool]:
        """One expert episode: per-step observations seen before each action, with the original keys.

        `state` is [agent_x, agent_y, block_x, block_y, block_angle] with the raw (unwrapped) angle, as in
        the original recordings (info["block_pose"]); `n_contacts` counts agent-block contact points in
        that observation's state.
        """
        env = self.make_env()
        expert = PushTExpert(seed)
        obs, info = env.reset(seed=seed)
        steps: dict[str, list[np.ndarray]] = {
            k: [] for k in ("state", "keypoint", "agent_pos", "action", "n_contacts")
        }
        if self.obs_type == "image":
            steps["img"] = []
        success = False
        for _ in range(self.max_episode_steps):
            action = expert.act(env)
            for key, value in self.step_record(env, obs, action).items():
                steps[key].append(value)
            obs, _, terminated, truncated, info = env.step(action)
            success = bool(info["is_success"])
            if terminated or truncated:
                break
        env.close()
        return {k: np.stack(v) for k, v in steps.items()}, success

    def step_record(
        self, env: gym.Env, obs: dict[str, np.ndarray], action: np.ndarray
    ) -> dict[str, np.ndarray]:
        """What a demonstration stores for one step: the observation seen before `action`, and the action
        (shared by the scripted collector and human teleoperation, tasks/record.py)."""
        s = get_state(env)
        record = {
            "state": np.array([s[0], s[1], s[4], s[5], s[6]], dtype=np.float32),
            "keypoint": env.unwrapped.keypoints(),
            "agent_pos": obs["agent_pos"],
            "action": action,
            "n_contacts": np.array([count_contacts(env)], dtype=np.float32),
        }
        if self.obs_type == "image":
            record["img"] = obs["img"]
        return record

    def summarize(self, rollouts: list[Rollout], out_dir: Path) -> dict[str, Any]:
        """Final and max coverage reward, how often 90% of the goal reward is reached, success step stats."""
        if not rollouts:
            return {}
        final = [float(r.rewards[-1]) if len(r.rewards) else 0.0 for r in rollouts]
        success_steps = [r.length for r in rollouts if r.success]
        return {
            "mean_final_reward": float(np.mean(final)),
            "max_reward_above_0.9": float(np.mean([r.max_reward > 0.9 for r in rollouts])),
            # None rather than NaN without successes: the report is JSON.
            "mean_success_step": float(np.mean(success_steps)) if success_steps else None,
            "median_success_step": float(np.median(success_steps)) if success_steps else None,
        }

    def draw_chunk(self, frame: np.ndarray, chunk: np.ndarray) -> np.ndarray:
        """Draw predicted targets (N, 2), in 512-pixel workspace units, as an orange polyline with dots."""
        import cv2

        frame = np.ascontiguousarray(frame, dtype=np.uint8).copy()
        h, w = frame.shape[:2]
        pts = np.asarray(chunk, dtype=np.float64).reshape(-1, 2) * [w / WORKSPACE, h / WORKSPACE]
        pts = np.round(pts[np.all(np.isfinite(pts), axis=1)]).astype(np.int32)
        if len(pts) == 0:
            return frame
        colour = (255, 140, 0)
        radius = max(1, round(min(h, w) / 128))
        if len(pts) > 1:
            cv2.polylines(frame, [pts.reshape(-1, 1, 2)], False, colour, max(1, radius // 2), cv2.LINE_AA)
        for p in pts:
            cv2.circle(frame, (int(p[0]), int(p[1])), radius, colour, -1, cv2.LINE_AA)
        return frame
