"""Human teleoperation of Push-T in a pygame window, recorded into an EpisodeStore (`diffpolicy record`).

As in the original Push-T demo script, the mouse drives the agent: the cursor's position in the window is
the agent's absolute target (before the mouse first moves, the agent holds still). Keys follow the
user's recording notes (LeRobot's `control_robot.py record`):

    Enter       keep the episode (saved) and start the next one
    Left arrow  discard the episode and restart it from its initial state (same seed)
    q / Escape  quit (the running episode is not saved); closing the window does the same

An episode stops advancing at the 300-step limit; it is saved only on Enter. Every step stores the same
keys as the scripted collector (`PushTTask.step_record`), so `diffpolicy train data.path=...` works on a
recording as on `diffpolicy collect`'s output. Only the window's event queue is read, so tests drive a
recording headless (SDL_VIDEODRIVER=dummy) by posting synthetic pygame events through `on_frame`; without
`on_frame`, a video driver that shows nothing (no display: SDL's offscreen or dummy driver) is refused.
The store is written beside `out` and put in place only once episodes are kept: a refused or empty
recording creates nothing and replaces nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from diffpolicy.data.episodes import EpisodeStore
from diffpolicy.data.formats.base import atomic_folder
from diffpolicy.tasks.pusht import WORKSPACE, PushTTask

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

# SDL video drivers that open no visible window (what SDL picks without DISPLAY / WAYLAND_DISPLAY)
INVISIBLE_DRIVERS = ("offscreen", "dummy")


class _NothingKept(Exception):
    """No episode was kept: the temporary store is discarded instead of put in place."""


class TeleopRecorder:
    """Runs the window; `run()` records until `n_episodes` are kept or the user quits."""

    def __init__(
        self,
        store: EpisodeStore,
        task: PushTTask,
        n_episodes: int,
        seed: int = 0,
        fps: float = 10.0,
        window: int = 512,
        on_frame: Callable[[int], None] | None = None,
    ) -> None:
        import pygame

        self.pg = pygame
        self.store, self.task, self.n_episodes = store, task, n_episodes
        self.seed, self.fps, self.window = seed, fps, window
        self.on_frame = on_frame  # called before each frame's events are read (tests post events here)
        self.kept = self.discarded = 0

    def _to_workspace(self, pos: tuple[int, int]) -> np.ndarray:
        return np.clip(np.asarray(pos, dtype=np.float64) * WORKSPACE / self.window, 0.0, WORKSPACE)

    def _draw(self, screen, frame: np.ndarray, status: str) -> None:
        pg = self.pg
        surface = pg.surfarray.make_surface(np.ascontiguousarray(frame.swapaxes(0, 1)))
        screen.blit(pg.transform.scale(surface, (self.window, self.window)), (0, 0))
        screen.blit(self.font.render(status, True, (0, 0, 0)), (8, 8))
        pg.display.flip()

    def run(self) -> int:
        """Record; returns the number of episodes kept."""
        pg = self.pg
        pg.display.init()  # display and font only: no audio device needed
        pg.font.init()
        try:
            driver = pg.display.get_driver()
            if driver in INVISIBLE_DRIVERS and self.on_frame is None:
                raise RuntimeError(
                    f"no screen for the teleoperation window: SDL chose its {driver!r} video driver (no "
                    "DISPLAY or WAYLAND_DISPLAY, or SDL_VIDEODRIVER says so), so nobody could see the window "
                    "or move the mouse in it; run diffpolicy record on a machine with a display (or over "
                    "ssh -X). Nothing was written."
                )
            screen = pg.display.set_mode((self.window, self.window))
            pg.display.set_caption("diffpolicy record: mouse drives, Enter keeps, Left redoes, q quits")
            self.font = pg.font.Font(None, 22)
            clock, frame_index = pg.time.Clock(), 0
            env = self.task.make_env()
            try:
                while self.kept < self.n_episodes:
                    seed = self.seed + self.kept  # a discarded attempt is redone from the same seed
                    outcome = self._episode(env, seed, screen, clock, frame_index)
                    frame_index = outcome[1]
                    if outcome[0] == "quit":
                        break
            finally:
                env.close()
        finally:
            pg.quit()
        return self.kept

    def _episode(self, env, seed: int, screen, clock, frame_index: int) -> tuple[str, int]:
        """One episode from `seed`; Left arrow restarts it from the same seed. Returns (outcome, frames)."""
        pg = self.pg
        while True:  # each pass is one attempt at this episode
            obs, _ = env.reset(seed=seed)
            steps: dict[str, list[np.ndarray]] = {}
            target: np.ndarray | None = None
            finished = False
            outcome = None
            while outcome is None:
                if self.on_frame is not None:
                    self.on_frame(frame_index)
                frame_index += 1
                for event in pg.event.get():
                    if event.type == pg.QUIT or (
                        event.type == pg.KEYDOWN and event.key in (pg.K_q, pg.K_ESCAPE)
                    ):
                        outcome = "quit"
                    elif event.type == pg.KEYDOWN and event.key in (pg.K_RETURN, pg.K_KP_ENTER):
                        outcome = "keep"
                    elif event.type == pg.KEYDOWN and event.key == pg.K_LEFT:
                        outcome = "discard"
                    elif event.type == pg.MOUSEMOTION:
                        target = self._to_workspace(event.pos)
                if outcome is None and not finished:
                    action = target if target is not None else np.asarray(obs["agent_pos"], dtype=np.float64)
                    for key, value in self.task.step_record(env, obs, action.astype(np.float32)).items():
                        steps.setdefault(key, []).append(value)
                    obs, _, terminated, truncated, info = env.step(action)
                    finished = terminated or truncated
                n = len(steps.get("action", []))
                status = f"episode {self.kept + 1}/{self.n_episodes} seed {seed}  step {n}" + (
                    "  done: Enter keeps, Left redoes" if finished else ""
                )
                self._draw(screen, env.render(), status)
                clock.tick(self.fps)
            if outcome == "discard":
                self.discarded += 1
                continue
            if outcome == "keep" and steps:
                self.store.add_episode({k: np.stack(v) for k, v in steps.items()})
                self.kept += 1
            return outcome, frame_index


def record_pusht(
    out: str | Path,
    n_episodes: int,
    obs_type: str = "state",
    seed: int = 0,
    fps: float = 10.0,
    fmt: str = "zarr",
    overwrite: bool = False,
    on_frame: Callable[[int], None] | None = None,
) -> int:
    """Record Push-T demonstrations by teleoperation into `out` (an EpisodeStore, or a LeRobot v3.0 folder
    with fmt="lerobot", written through an EpisodeStore beside it); returns the episodes kept."""
    import tempfile

    out = Path(out)
    if fmt not in ("zarr", "lerobot"):
        raise ValueError(f"format {fmt!r} is not 'zarr' or 'lerobot'")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{str(out)!r} already exists; pass --overwrite to replace it")
    task = PushTTask(obs_type=obs_type)

    def record(path: Path) -> int:
        store = EpisodeStore.create(path, overwrite=True)  # `path` is this recording's own temporary
        store.attrs.update(
            {
                "task": "pusht",
                "task_kwargs": {"obs_type": obs_type},
                "fps": fps,
                "recorded_by": "teleoperation",
            }
        )
        kept = TeleopRecorder(store, task, n_episodes, seed=seed, fps=fps, on_frame=on_frame).run()
        # episode i started from seed + i (a redone attempt reuses its seed): train / eval check these
        store.attrs.update({"seeds_start": seed, "seeds": list(range(seed, seed + kept))})
        if fmt == "lerobot" and kept:
            from diffpolicy.data.formats.lerobot import write_lerobot

            write_lerobot(store, out, fps=fps, task=task.description(), overwrite=overwrite, progress=False)
        return kept

    if fmt == "lerobot":  # write_lerobot puts the folder in place atomically
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
            return record(Path(tmp) / "store.zarr")
    kept = 0
    try:
        with atomic_folder(out, overwrite) as tmp:
            kept = record(tmp)
            if not kept:
                raise _NothingKept
    except _NothingKept:
        pass
    return kept
