"""Normalizer: affine maps per mode, round trips, checkpoints and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffpolicy.data.normalize import Normalizer


@pytest.fixture
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    action = rng.uniform(0, 512, size=(500, 2))
    state = np.concatenate([rng.normal(3.0, 2.0, size=(500, 2)), np.full((500, 1), 7.0)], axis=1)
    return {"action": action, "state": state}


@pytest.fixture
def fitted(data) -> Normalizer:
    modes = {"action": "minmax", "state": "gaussian", "image": "image", "raw": "identity"}
    return Normalizer.fit(data, modes)


def test_minmax_maps_train_range_to_unit_interval(fitted: Normalizer, data):
    x = torch.as_tensor(data["action"], dtype=torch.float32)
    y = fitted.normalize("action", x)
    torch.testing.assert_close(y.min(0).values, torch.tensor([-1.0, -1.0]))
    torch.testing.assert_close(y.max(0).values, torch.tensor([1.0, 1.0]))
    lo, hi = data["action"].min(0), data["action"].max(0)
    expected = 2 * (data["action"] - lo) / (hi - lo) - 1
    torch.testing.assert_close(y, torch.as_tensor(expected, dtype=torch.float32), atol=1e-5, rtol=0)
    stats = fitted.stats("action")
    torch.testing.assert_close(stats["input_min"], torch.as_tensor(lo, dtype=torch.float32))
    torch.testing.assert_close(stats["input_max"], torch.as_tensor(hi, dtype=torch.float32))


@pytest.mark.parametrize("mode", ["minmax", "gaussian"])
def test_round_trip_with_leading_dims(mode: str, data):
    norm = Normalizer.fit(data, {"action": mode, "state": mode})
    for key in ("action", "state"):
        x = torch.as_tensor(data[key][:60], dtype=torch.float32).reshape(4, 15, -1)  # (B, T, D)
        y = norm.normalize(key, x)
        assert y.shape == x.shape
        torch.testing.assert_close(norm.unnormalize(key, y), x, atol=1e-4, rtol=1e-5)


def test_constant_dimension_maps_to_zero_and_round_trips(data):
    for mode in ("minmax", "gaussian"):
        norm = Normalizer.fit(data, {"state": mode})
        x = torch.as_tensor(data["state"], dtype=torch.float32)
        y = norm.normalize("state", x)
        assert torch.all(y[:, 2] == 0)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(norm.unnormalize("state", y), x, atol=1e-5, rtol=1e-5)
        assert norm.stats("state")["scale"][2] == 1.0


def test_minmax_range_eps(data):
    tiny = data["action"].copy()
    tiny[:, 1] = 5.0 + np.linspace(0, 1e-3, len(tiny))
    wide = Normalizer.fit({"a": tiny}, {"a": "minmax"}, range_eps=1e-4)
    flat = Normalizer.fit({"a": tiny}, {"a": "minmax"}, range_eps=1e-2)
    x = torch.as_tensor(tiny, dtype=torch.float32)
    assert wide.normalize("a", x)[:, 1].max() == pytest.approx(1.0, abs=1e-2)
    assert flat.normalize("a", x)[:, 1].abs().max() <= 1e-3


def test_gaussian_moments(fitted: Normalizer, data):
    y = fitted.normalize("state", torch.as_tensor(data["state"], dtype=torch.float64))
    assert y.dtype == torch.float64
    torch.testing.assert_close(y[:, :2].mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        y[:, :2].std(0, unbiased=False), torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0
    )
    stats = fitted.stats("state")
    as_f32 = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    torch.testing.assert_close(stats["input_mean"], as_f32(data["state"].mean(0)))
    torch.testing.assert_close(stats["input_std"], as_f32(data["state"].std(0)))


def test_image_and_identity(fitted: Normalizer):
    img = torch.rand(2, 3, 3, 8, 8)  # (B, T, C, H, W)
    out = fitted.normalize("image", img)
    torch.testing.assert_close(out, img * 2 - 1)
    assert fitted.normalize("image", torch.tensor([0.0, 0.5, 1.0])).tolist() == [-1.0, 0.0, 1.0]
    torch.testing.assert_close(fitted.unnormalize("image", out), img)
    raw = torch.randn(5, 4)
    assert torch.equal(fitted.normalize("raw", raw), raw)
    assert fitted.mode("image") == "image" and fitted.mode("raw") == "identity"


def test_image_only_normalizer_needs_no_data():
    norm = Normalizer.fit({}, {"cam": "image"})
    assert norm.is_fitted
    assert norm.normalize("cam", torch.ones(1)).item() == 1.0


def test_dtype_device_and_normalize_obs(fitted: Normalizer):
    x = torch.randn(3, 2, dtype=torch.bfloat16)
    assert fitted.normalize("action", x).dtype == torch.bfloat16
    obs = {"state": torch.randn(2, 4, 3), "image": torch.rand(2, 4, 3, 8, 8)}
    out = fitted.normalize_obs(obs)
    assert sorted(out) == ["image", "state"]
    torch.testing.assert_close(out["state"], fitted.normalize("state", obs["state"]))
    torch.testing.assert_close(out["image"], obs["image"] * 2 - 1)
    with pytest.raises(KeyError, match="'depth'"):
        fitted.normalize_obs({"depth": torch.zeros(1)})


def test_properties(fitted: Normalizer):
    assert fitted.keys == ["action", "state", "image", "raw"]
    assert fitted.spec["action"] == ("minmax", 2) and fitted.spec["state"] == ("gaussian", 3)
    assert "action" in fitted and "nope" not in fitted
    assert "minmax[2]" in repr(fitted)


# ---------------------------------------------------------------------- checkpoints
def test_state_dict_into_fresh_unfitted_normalizer(fitted: Normalizer, tmp_path: Path):
    fresh = Normalizer(fitted.spec)
    assert not fresh.is_fitted
    x = torch.randn(4, 2) * 100 + 200
    with pytest.raises(RuntimeError, match="not fitted.*Normalizer.fit or load a state_dict"):
        fresh.normalize("action", x)
    fresh.load_state_dict(fitted.state_dict())
    assert fresh.is_fitted and bool(fresh.fitted)
    torch.testing.assert_close(fresh.normalize("action", x), fitted.normalize("action", x))
    torch.testing.assert_close(
        fresh.unnormalize("state", x[:, :1].repeat(1, 3)), fitted.unnormalize("state", x[:, :1].repeat(1, 3))
    )

    path = tmp_path / "normalizer.safetensors"
    save_file(fitted.state_dict(), str(path))
    from_file = Normalizer(fitted.spec)
    from_file.load_state_dict(load_file(str(path)))
    assert from_file.is_fitted
    torch.testing.assert_close(from_file.normalize("action", x), fitted.normalize("action", x))
    img = torch.rand(3, 3, 4, 4)
    torch.testing.assert_close(from_file.normalize("image", img), fitted.normalize("image", img))


def test_first_difference(fitted: Normalizer, data):
    twin = Normalizer(fitted.spec)
    assert twin.first_difference(fitted) == "fitted"  # an unfitted twin differs in its flag first
    twin.load_state_dict(fitted.state_dict())
    assert twin.first_difference(fitted) is None
    twin.params["state"].input_mean.add_(1.0)  # statistics of other data
    assert twin.first_difference(fitted) == "params.state.input_mean"
    fewer = Normalizer.fit({"action": data["action"]}, {"action": "minmax"})
    assert fewer.first_difference(fitted) is not None  # keys only one of them has


def test_loads_as_submodule_of_a_policy(fitted: Normalizer):
    class Policy(nn.Module):
        def __init__(self, normalizer: Normalizer):
            super().__init__()
            self.normalizer = normalizer
            self.net = nn.Linear(2, 2)

    trained = Policy(fitted)
    restored = Policy(Normalizer(fitted.spec))
    restored.load_state_dict(trained.state_dict())
    assert restored.normalizer.is_fitted
    x = torch.randn(2, 2)
    torch.testing.assert_close(restored.normalizer.normalize("action", x), fitted.normalize("action", x))


def test_unfitted_state_dict_stays_unfitted(fitted: Normalizer):
    fresh = Normalizer(fitted.spec)
    fitted.load_state_dict(Normalizer(fitted.spec).state_dict())
    assert not fitted.is_fitted and not fresh.is_fitted


def test_load_rejects_mismatched_spec(fitted: Normalizer):
    wrong = Normalizer(
        {"action": ("minmax", 3), "state": ("gaussian", 3), "image": ("image", 1), "raw": ("identity", 1)}
    )
    with pytest.raises(RuntimeError, match="action"):
        wrong.load_state_dict(fitted.state_dict())


# ---------------------------------------------------------------------- errors
def test_errors(fitted: Normalizer, data):
    with pytest.raises(KeyError, match=r"'nope'.*\['action', 'state', 'image', 'raw'\]"):
        fitted.normalize("nope", torch.zeros(2))
    with pytest.raises(ValueError, match="'action'.*last dimension must be 2"):
        fitted.normalize("action", torch.zeros(4, 3))
    with pytest.raises(ValueError, match="'action'.*floating"):
        fitted.normalize("action", torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(KeyError, match="'gripper'"):
        Normalizer.fit(data, {"gripper": "minmax"})
    bad = data["action"].copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="'action'.*non-finite"):
        Normalizer.fit({"action": bad}, {"action": "minmax"})
    with pytest.raises(ValueError, match="'action'.*empty"):
        Normalizer.fit({"action": np.zeros((0, 2))}, {"action": "gaussian"})
    with pytest.raises(ValueError, match=r"'action'.*\(N, D\)"):
        Normalizer.fit({"action": np.zeros(5)}, {"action": "gaussian"})
    with pytest.raises(ValueError, match="'action'.*unknown mode 'zscore'"):
        Normalizer.fit(data, {"action": "zscore"})
    with pytest.raises(ValueError, match=r"'obs\.state'.*'\.'"):
        Normalizer({"obs.state": ("minmax", 2)})
    with pytest.raises(ValueError, match="'keys'"):
        Normalizer({"keys": ("minmax", 2)})
    with pytest.raises(ValueError, match="feature_dim"):
        Normalizer({"action": ("minmax", 0)})


def test_fit_accepts_tensors(data):
    from_np = Normalizer.fit(data, {"action": "minmax"})
    from_torch = Normalizer.fit({"action": torch.as_tensor(data["action"])}, {"action": "minmax"})
    x = torch.randn(3, 2)
    torch.testing.assert_close(from_np.normalize("action", x), from_torch.normalize("action", x))
