"""How well does an image policy's camera encoder see the block? A linear probe of its features.

    python bench/image_probe.py runs/img_a/checkpoints/latest data/pusht_image.zarr [--frames 4000]

Encodes frames of the store with the checkpoint's camera encoder (evaluation mode: centre crop) and fits
a ridge regression from the per-frame camera features to the block pose in the store's `state` key
(x, y in workspace pixels; the angle as cos / sin), on the checkpoint's own training episodes, then
reports the error on its validation episodes and on a probe of a freshly initialised encoder of the same
architecture (the floor a random-feature encoder gives). Diagnoses the limiting factor of an image policy:
an encoder that cannot place the block cannot push it. Prints numbers only; asserts nothing.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from diffpolicy.data.episodes import EpisodeStore
from diffpolicy.data.sequence import prepare_obs, split_episodes
from diffpolicy.policy import load_policy, make_policy


def camera_features(policy: torch.nn.Module, frames: np.ndarray, batch: int = 256) -> np.ndarray:
    """(N, H, W, C) uint8 frames -> (N, F) features of the policy's camera encoder (one step windows)."""
    rgb = policy.obs_encoder.rgb
    key = rgb.keys[0]
    out = []
    with torch.no_grad():
        for start in range(0, len(frames), batch):
            x = torch.from_numpy(prepare_obs(frames[start : start + batch], "rgb"))[
                :, None
            ]  # (B, 1, C, H, W)
            x = policy.normalizer.normalize(key, x)
            out.append(rgb({key: x})[:, 0].float().numpy())
    return np.concatenate(out)


def pose_targets(state: np.ndarray) -> np.ndarray:
    """Block x, y (pixels) and the angle as cos, sin (scaled by 100 px, so errors weigh alike)."""
    return np.stack([state[:, 2], state[:, 3], 100 * np.cos(state[:, 4]), 100 * np.sin(state[:, 4])], axis=1)


def angle(y: np.ndarray) -> np.ndarray:
    return np.arctan2(y[:, 3], y[:, 2])


def wrap(a: np.ndarray) -> np.ndarray:
    """Angles to (-pi, pi]."""
    return np.angle(np.exp(1j * a))


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> dict:
    """Ridge regression (features standardised, bias) fitted on train, RMSE per target on test."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a = np.hstack([(train_x - mean) / std, np.ones((len(train_x), 1))])
    b = np.hstack([(test_x - mean) / std, np.ones((len(test_x), 1))])
    w = np.linalg.solve(a.T @ a + 1e-2 * len(a) * np.eye(a.shape[1]), a.T @ train_y)
    err = b @ w - test_y
    return {
        "xy_rmse_px": float(np.sqrt((err[:, :2] ** 2).sum(1).mean())),
        "angle_rmse_deg": float(np.degrees(np.sqrt(np.mean(wrap(angle(b @ w) - angle(test_y)) ** 2)))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("store")
    parser.add_argument("--frames", type=int, default=4000, help="frames sampled from each side")
    args = parser.parse_args()
    policy, cfg = load_policy(args.checkpoint)
    store = EpisodeStore.open(args.store, mode="r")
    ends = store.episode_ends
    starts = np.concatenate([[0], ends[:-1]])
    train_ids, val_ids = split_episodes(len(ends), 0.2, seed=123)  # the probe's own split of episodes
    rng = np.random.default_rng(0)

    def frames_of(ids: np.ndarray) -> np.ndarray:
        rows = np.concatenate([np.arange(starts[i], ends[i]) for i in ids])
        return np.sort(rng.choice(rows, size=min(args.frames, len(rows)), replace=False))

    tr, te = frames_of(train_ids), frames_of(val_ids)
    images, state = np.asarray(store["img"][:]), np.asarray(store["state"][:])
    torch.manual_seed(0)
    fresh = make_policy(cfg.policy, policy.shape_meta).eval()
    fresh.normalizer.load_state_dict(policy.normalizer.state_dict())
    for name, net in (("trained", policy), ("fresh init", fresh)):
        fx_tr, fx_te = camera_features(net, images[tr]), camera_features(net, images[te])
        result = probe(fx_tr, pose_targets(state[tr]), fx_te, pose_targets(state[te]))
        xy, deg = result["xy_rmse_px"], result["angle_rmse_deg"]
        print(f"{name:10s} block position RMSE {xy:6.1f} px  angle RMSE {deg:5.1f} deg")
    print(
        f"(held-out episodes: {len(val_ids)}; frames {len(tr)} / {len(te)}; a constant guess: "
        f"{np.sqrt(((state[te, 2:4] - state[tr, 2:4].mean(0)) ** 2).sum(1).mean()):.1f} px)"
    )


if __name__ == "__main__":
    main()
