"""Cached frozen-backbone features (policy.vision.cache_features): the cached path equals the on-line one,
the cache key changes with everything the maps depend on, refusals are clear. Tiny timm ViTs with random
weights (pretrained=False): nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("timm")

from conftest import TINY  # noqa: E402

from diffpolicy.config import ConfigError, load_config, validate  # noqa: E402
from diffpolicy.data.episodes import EpisodeStore  # noqa: E402
from diffpolicy.data.normalize import Normalizer  # noqa: E402
from diffpolicy.data.sequence import SequenceDataset, features_key, prepare_obs  # noqa: E402
from diffpolicy.policy import load_policy, make_policy, normalizer_spec  # noqa: E402
from diffpolicy.training.feature_cache import build_or_open  # noqa: E402

H, W = 32, 48
SHAPE_META = {
    "obs": {
        "top": {"shape": [3, H, W], "type": "rgb"},
        "side": {"shape": [3, H, W], "type": "rgb"},
        "state": {"shape": [2], "type": "low_dim"},
    },
    "action": {"shape": [2]},
}
VIT = [
    "policy.vision.backbone=timm:vit_tiny_patch16_224",
    "policy.vision.freeze_backbone=true",
    "policy.vision.cache_features=true",
    "policy.vision.imagenet_norm=true",
    "policy.vision.crop_shape=[32,32]",  # a real crop: centred in training under the cache
    "policy.vision.num_keypoints=4",
    "policy.vision.feature_dim=8",
]


def make_store(path: Path, lengths=(20, 13), seed: int = 0) -> EpisodeStore:
    rng = np.random.default_rng(seed)
    store = EpisodeStore.create(path)
    for n in lengths:
        store.add_episode(
            {
                "top": rng.integers(0, 256, size=(n, H, W, 3), dtype=np.uint8),
                "side": rng.integers(0, 256, size=(n, H, W, 3), dtype=np.uint8),
                "state": rng.normal(size=(n, 2)),
                "action": rng.normal(size=(n, 2)),
            }
        )
    return store


def vit_policy(*overrides: str, seed: int = 0):
    cfg = load_config(None, [*TINY, *VIT, *overrides])
    validate(cfg)
    torch.manual_seed(seed)
    policy = make_policy(cfg.policy, SHAPE_META)
    spec = normalizer_spec(SHAPE_META, cfg.policy.normalization)
    data = {"state": torch.randn(64, 2), "action": torch.randn(64, 2)}
    policy.normalizer.load_state_dict(Normalizer.fit(data, {k: m for k, (m, _) in spec.items()}).state_dict())
    return policy, cfg


def frames(store: EpisodeStore, key: str, rows: np.ndarray) -> torch.Tensor:
    """Rows of the store as the policy takes camera frames: (B, T, C, H, W) float in [0, 1]."""
    return torch.from_numpy(np.asarray(store[key][:])[rows]).permute(0, 1, 4, 2, 3).float() / 255


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_encoder_output_from_cached_features_equals_the_online_output(tmp_path, precision):
    store = make_store(tmp_path / "demos.zarr")
    policy, _ = vit_policy(f"policy.vision.precision={precision}")
    gathers = build_or_open(policy, store, tmp_path / "cache", chunk=7)  # chunks that do not divide 33
    rows = np.array([[0, 1], [5, 6], [19, 20], [31, 32]])
    images = {k: frames(store, k, rows) for k in ("top", "side")}
    encoder = policy.obs_encoder.rgb
    for training in (True, False):  # the centre crop in training too: the cached view is the one view
        encoder.train(training)
        normalized = {k: policy.normalizer.normalize(k, v) for k, v in images.items()}
        online = encoder(normalized)
        cached = encoder({}, {k: gathers[k](rows) for k in ("top", "side")})
        torch.testing.assert_close(cached, online, atol=1e-5, rtol=1e-5)
    # The policy's conditioning, through encode_obs: frames, or the cached maps under features_key
    obs = {"state": torch.randn(4, 2, 2), **images}
    with_features = {"state": obs["state"], **{features_key(k): gathers[k](rows) for k in ("top", "side")}}
    torch.testing.assert_close(policy.encode_obs(with_features), policy.encode_obs(obs), atol=1e-5, rtol=1e-5)

    # The check has teeth: maps cached without ImageNet normalization (same weights) go to another file
    # and do not give the encoder's on-line output.
    other, _ = vit_policy(f"policy.vision.precision={precision}", "policy.vision.imagenet_norm=false")
    other.load_state_dict(policy.state_dict())
    wrong = build_or_open(other, store, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("top-*.npy"))) == 2
    encoder.eval()
    mismatch = encoder({}, {k: wrong[k](rows) for k in ("top", "side")})
    online = encoder({k: policy.normalizer.normalize(k, v) for k, v in images.items()})
    assert (mismatch - online).abs().max() > 1e-2


def stems(folder: Path) -> set[str]:
    return {p.stem for p in folder.glob("*.npy")}


def test_cache_key_changes_with_data_weights_and_preprocessing(tmp_path, caplog):
    store = make_store(tmp_path / "a.zarr")
    policy, _ = vit_policy()
    folder = tmp_path / "cache"
    build_or_open(policy, store, folder)
    first = stems(folder)
    assert len(first) == 2  # one file per camera
    caplog.clear()  # an earlier test in this worker may have left the logger at INFO: the first build logged
    with caplog.at_level("INFO", logger="diffpolicy"):
        build_or_open(policy, store, folder)  # same everything: reused, not recomputed
    assert stems(folder) == first and "computing" not in caplog.text and "from" in caplog.text
    changes = {
        "other frames": (lambda: make_store(tmp_path / "b.zarr", seed=1), ()),
        "other episode boundaries": (lambda: make_store(tmp_path / "c.zarr", lengths=(13, 20)), ()),
        "other weights (seed)": (lambda: store, ("seed",)),
        "other crop": (lambda: store, ("policy.vision.crop_shape=[32,48]",)),
        "other resize": (lambda: store, ("policy.vision.resize_shape=[48,64]",)),
        "other precision": (lambda: store, ("policy.vision.precision=bf16",)),
    }
    seen = set(first)
    for what, (get_store, overrides) in changes.items():
        seed = 1 if "seed" in overrides else 0
        p, _ = vit_policy(*[o for o in overrides if o != "seed"], seed=seed)
        if not overrides:
            p.load_state_dict(policy.state_dict())
        before = stems(folder)
        build_or_open(p, get_store(), folder)
        new = stems(folder) - before
        assert len(new) == 2 and not new & seen, what
        seen |= new


def test_dataset_hands_the_cached_maps_of_the_window_rows(tmp_path):
    """Every sample's feature entry holds the maps of exactly the store rows its frames come from, batched or
    not, with frames in memory or read from the store, with a frame stride."""
    store = make_store(tmp_path / "demos.zarr", lengths=(9, 14, 11))
    rows = lambda r: torch.from_numpy(np.asarray(r))  # noqa: E731 (a gather that returns the row numbers)
    for in_memory in (True, False):
        for stride in (1, 2):
            kw = dict(horizon=4, n_obs_steps=2, n_action_steps=2, episodes=[0, 2], frame_stride=stride)
            plain = SequenceDataset(store, SHAPE_META, cache_in_memory=in_memory, **kw)
            feat = SequenceDataset(store, SHAPE_META, cache_in_memory=in_memory, feature_keys=["top"], **kw)
            with pytest.raises(RuntimeError, match="none were attached"):
                feat[0]
            feat.attach_features({"top": rows})
            top = np.asarray(store["top"][:])
            batch = feat.get_batch(np.arange(len(feat)))
            expected = plain.get_batch(np.arange(len(plain)))
            assert "top" not in batch["obs"] and torch.equal(batch["obs"]["side"], expected["obs"]["side"])
            got = batch["obs"][features_key("top")]
            want = torch.from_numpy(prepare_obs(top[got.numpy()], "rgb"))
            assert torch.equal(want, expected["obs"]["top"])
            assert torch.equal(feat[3]["obs"][features_key("top")], got[3])


def test_refusals_name_the_problem():
    with pytest.raises(ConfigError, match="needs policy.vision.freeze_backbone=true"):
        validate(load_config(None, [*VIT, "policy.vision.freeze_backbone=false"]))
    with pytest.raises(ConfigError, match="colour jitter"):
        validate(load_config(None, [*VIT, "policy.vision.color_jitter=0.2"]))
    store_meta = {"obs": {"state": {"shape": [2], "type": "low_dim"}}, "action": {"shape": [2]}}
    cfg = load_config(None, [*TINY, *VIT])
    policy = make_policy(cfg.policy, store_meta)
    with pytest.raises(ValueError, match="no camera inputs"):
        build_or_open(policy, None, "unused")


def test_training_from_the_cache_then_acting_on_camera_frames(tmp_path, caplog):
    """A run trains on cached maps (frames never loaded), resumes on the same cache, and its checkpoint acts
    on raw frames, running the backbone."""
    from diffpolicy.training.trainer import Trainer

    make_store(tmp_path / "demos.zarr")
    overrides = [
        *TINY,
        *VIT,
        "task.name=",
        f"data.path={tmp_path / 'demos.zarr'}",
        "policy.horizon=8",
        "policy.n_action_steps=4",
        "train.batch_size=8",
        "train.num_steps=4",
        "train.stop_at_step=2",
        "train.val_every=2",
        "eval.n_episodes=0",
    ]
    run = tmp_path / "run"
    with caplog.at_level("INFO", logger="diffpolicy"):
        trainer = Trainer(load_config(None, overrides), run, show_progress=False)
        trainer.fit()
        assert "top" not in trainer.train_set._cache and "state" in trainer.train_set._cache
        trainer = Trainer(load_config(None, [*overrides, "train.stop_at_step=0"]), run, show_progress=False)
        trainer.fit()
    log = (run / "train.log").read_text()
    assert log.count("computing camera") == 2 and log.count("feature cache: camera 'top' from") == 1
    assert "RANDOM initial weights" in log
    assert len(list((run / "feature_cache").glob("*.npy"))) == 2
    policy, _ = load_policy(run / "checkpoints" / "latest")
    store = EpisodeStore.open(tmp_path / "demos.zarr")
    obs = {
        "state": torch.randn(1, 2, 2),
        **{k: frames(store, k, np.array([[3, 4]])) for k in ("top", "side")},
    }
    out = policy.predict_action(obs)
    assert out["action"].shape == (1, 4, 2) and torch.isfinite(out["action"]).all()
