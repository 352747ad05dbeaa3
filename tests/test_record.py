"""`diffpolicy record`, headless: scripted pygame events drive the teleoperation window."""

import os

os.environ["SDL_VIDEODRIVER"] = "dummy"  # before pygame opens a window

from pathlib import Path

import numpy as np
import pygame
import pytest

import diffpolicy
from diffpolicy.data.episodes import EpisodeStore
from diffpolicy.tasks.pusht import PushTTask
from diffpolicy.tasks.record import record_pusht


def scripted(events_at):
    def on_frame(i):
        for kind, value in events_at.get(i, []):
            if kind == "mouse":
                pygame.event.post(
                    pygame.event.Event(pygame.MOUSEMOTION, pos=value, rel=(0, 0), buttons=(0, 0, 0))
                )
            else:
                pygame.event.post(
                    pygame.event.Event(pygame.KEYDOWN, key=value, mod=0, unicode="", scancode=0)
                )

    return on_frame


SCRIPT = {
    0: [("mouse", (100, 100))],  # attempt 1 runs frames 0-4 (5 steps) ...
    5: [("key", pygame.K_LEFT)],  # ... and is discarded: the episode restarts from the same seed
    6: [("mouse", (256, 128))],  # attempt 2: two steps towards (256, 128) ...
    8: [("key", pygame.K_RETURN)],  # ... kept
    12: [("key", pygame.K_q)],  # episode 2 runs frames 9-11 and is dropped by quitting
}


def test_record_keeps_discards_and_quits(tmp_path):
    out = tmp_path / "teleop.zarr"
    kept = record_pusht(out, n_episodes=5, seed=7, fps=0, on_frame=scripted(SCRIPT))
    assert kept == 1
    store = EpisodeStore.open(out)
    assert store.n_episodes == 1 and list(store.episode_lengths) == [2]
    assert sorted(store.keys) == sorted(["state", "keypoint", "agent_pos", "action", "n_contacts"])
    ep = store.get_episode(0)
    np.testing.assert_allclose(ep["action"], [[256, 128], [256, 128]])
    env = PushTTask().make_env()
    obs, _ = env.reset(seed=7)  # the kept attempt started from the seed's initial state
    np.testing.assert_allclose(ep["keypoint"][0], obs["keypoint"])
    np.testing.assert_allclose(ep["agent_pos"][0], obs["agent_pos"])
    env.close()
    assert store.attrs["task"] == "pusht" and store.attrs["fps"] == 0
    assert list(store.attrs["seeds"]) == [7]  # what train / eval check evaluation seeds against
    quit_at_once = tmp_path / "none.zarr"  # nothing kept: no empty store left behind
    assert record_pusht(quit_at_once, 1, fps=0, on_frame=scripted({0: [("key", pygame.K_q)]})) == 0
    assert not quit_at_once.exists()


def test_record_lerobot_format(tmp_path):
    script = {0: [("mouse", (300, 300))], 3: [("key", pygame.K_RETURN)], 6: [("key", pygame.K_RETURN)]}
    kept = record_pusht(tmp_path / "lr", n_episodes=2, fps=10, fmt="lerobot", on_frame=scripted(script))
    assert kept == 2
    assert (tmp_path / "lr" / "meta" / "info.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["lr"]  # the temporary store is gone
    with pytest.raises(FileExistsError):
        record_pusht(tmp_path / "lr", n_episodes=1, fmt="lerobot")


def test_record_without_a_screen_refuses_and_creates_nothing(tmp_path):
    """Headless (no DISPLAY: SDL falls back to its offscreen driver) nobody can see the window or move the
    mouse: record stops at once with a message saying so, and neither creates nor replaces a store. (It
    used to wait forever on the invisible window, having emptied the store.) A subprocess with a timeout,
    so a regression fails instead of hanging the suite."""
    import subprocess
    import sys

    out = tmp_path / "mine.zarr"
    store = EpisodeStore.create(out)
    store.add_episode({"action": np.zeros((3, 2), np.float32)})
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["SDL_VIDEODRIVER"] = "offscreen"
    package_root = str(Path(diffpolicy.__file__).resolve().parents[1])  # this checkout's code
    env["PYTHONPATH"] = os.pathsep.join([package_root, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "diffpolicy.cli", "record", "--episodes", "1", "--out", str(out)]
    result = subprocess.run([*cmd, "--overwrite"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "no screen" in result.stderr and "offscreen" in result.stderr
    assert EpisodeStore.open(out).n_episodes == 1  # the user's store is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["mine.zarr"]  # and nothing else was written
    result = subprocess.run(
        [*cmd[:-1], str(tmp_path / "new.zarr")], env=env, capture_output=True, timeout=120
    )
    assert result.returncode == 2 and not (tmp_path / "new.zarr").exists()
