"""Per-key affine normalization ``y = x * scale + offset``, stored as module buffers.

The normalizer is fitted once on the training data and lives inside the policy, so its parameters
travel in the policy's ``state_dict`` / safetensors checkpoint. Modes:

* ``minmax``: each feature to [-1, 1]; features whose range is below ``range_eps`` map to 0
  (scale 1, offset -min), so constant dimensions neither explode nor carry noise.
* ``gaussian``: zero mean, unit std per feature (std below ``range_eps`` treated as 1).
* ``image``: scalar map [0, 1] -> [-1, 1] (scale 2, offset -1); needs no data. Its inputs are frames
  made by ``data.sequence.prepare_obs``: uint8, or float in 0..255, divided by 255 once (stored float
  frames already in [0, 1] are refused by SequenceDataset, naming the key, not divided again).
* ``identity``: scalar scale 1, offset 0.

Low-dim maps act on the last dimension and broadcast over leading (batch, time) dimensions; image
and identity maps are scalars.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["NORMALIZER_MODES", "Normalizer"]

NORMALIZER_MODES = ("minmax", "gaussian", "image", "identity")
_DATA_MODES = ("minmax", "gaussian")
_STAT_NAMES = ("input_min", "input_max", "input_mean", "input_std")
# Keys become submodule names of an nn.ModuleDict: they must not shadow its attributes.
_RESERVED_NAMES = nn.ModuleDict()


class _KeyParams(nn.Module):
    """Buffers of one key: the affine map and the input statistics it was fitted on."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("offset", torch.zeros(shape))
        # Defaults describe the identity map in both minmax and gaussian terms.
        self.register_buffer("input_min", torch.full(shape, -1.0))
        self.register_buffer("input_max", torch.ones(shape))
        self.register_buffer("input_mean", torch.zeros(shape))
        self.register_buffer("input_std", torch.ones(shape))

    def set(self, **values: np.ndarray | float) -> None:
        for name, value in values.items():
            buf = getattr(self, name)
            arr = np.asarray(value, dtype=np.float64)
            buf.copy_(torch.as_tensor(arr, dtype=buf.dtype).reshape(buf.shape))


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"normalizer key must be a non-empty string, got {key!r}")
    if "." in key:
        raise ValueError(f"normalizer key {key!r} contains '.', which nn.Module names cannot hold")
    if hasattr(_RESERVED_NAMES, key):
        raise ValueError(f"normalizer key {key!r} clashes with an nn.ModuleDict attribute; rename it")
    return key


class Normalizer(nn.Module):
    """Per-key affine normalizer; build with :meth:`fit`, or from a spec and then load a state_dict.

    ``spec`` maps key -> ``(mode, feature_dim)``; ``feature_dim`` is ignored for image/identity.
    A freshly constructed normalizer is unfitted: its buffers have the right shapes (so a checkpoint
    can be loaded into it) but using it raises until it is fitted or loaded.
    """

    fitted: Tensor

    def __init__(self, spec: Mapping[str, tuple[str, int]]):
        super().__init__()
        self._spec: dict[str, tuple[str, int]] = {}
        self.params = nn.ModuleDict()
        for key, entry in spec.items():
            _check_key(key)
            try:
                mode, feature_dim = entry
            except (TypeError, ValueError):
                raise ValueError(f"spec for key {key!r} must be (mode, feature_dim), got {entry!r}") from None
            if mode not in NORMALIZER_MODES:
                raise ValueError(f"key {key!r}: unknown mode {mode!r}; expected one of {NORMALIZER_MODES}")
            if mode in _DATA_MODES:
                if int(feature_dim) != feature_dim or feature_dim < 1:
                    raise ValueError(
                        f"key {key!r}: feature_dim must be a positive integer, got {feature_dim}"
                    )
                shape: tuple[int, ...] = (int(feature_dim),)
            else:
                shape = ()
            params = _KeyParams(shape)
            if mode == "image":
                params.set(
                    scale=2.0, offset=-1.0, input_min=0.0, input_max=1.0, input_mean=0.5, input_std=0.5
                )
            self.params[key] = params
            self._spec[key] = (mode, int(feature_dim))
        self.register_buffer("fitted", torch.tensor(False))
        self._is_fitted = False
        self.register_load_state_dict_post_hook(Normalizer._sync_fitted_flag)

    @staticmethod
    def _sync_fitted_flag(module: nn.Module, incompatible_keys: Any) -> None:
        # Cache the flag on the host so normalize() never synchronizes with the GPU.
        module._is_fitted = bool(module.fitted.item())

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        data: Mapping[str, np.ndarray | Tensor],
        modes: Mapping[str, str],
        range_eps: float = 1e-4,
    ) -> Normalizer:
        """Fit a normalizer for each key of ``modes`` on ``(N, D)`` arrays in ``data``.

        Keys of ``data`` not named in ``modes`` are ignored; image/identity keys need no data.
        """
        if range_eps < 0:
            raise ValueError(f"range_eps must be >= 0, got {range_eps}")
        arrays: dict[str, np.ndarray] = {}
        spec: dict[str, tuple[str, int]] = {}
        for key, mode in modes.items():
            if mode not in NORMALIZER_MODES:
                raise ValueError(f"key {key!r}: unknown mode {mode!r}; expected one of {NORMALIZER_MODES}")
            if mode not in _DATA_MODES:
                spec[key] = (mode, 1)
                continue
            if key not in data:
                raise KeyError(f"no data for key {key!r} (mode {mode!r}); data keys: {sorted(data)}")
            value = data[key]
            if isinstance(value, Tensor):
                value = value.detach().cpu().numpy()
            arr = np.asarray(value, dtype=np.float64)
            if arr.ndim != 2:
                raise ValueError(f"data for key {key!r} must have shape (N, D), got {arr.shape}")
            if arr.shape[0] == 0 or arr.shape[1] == 0:
                raise ValueError(f"data for key {key!r} is empty (shape {arr.shape})")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"data for key {key!r} contains non-finite values (NaN or inf)")
            arrays[key] = arr
            spec[key] = (mode, arr.shape[1])

        out = cls(spec)
        for key, arr in arrays.items():
            mode = spec[key][0]
            lo, hi = arr.min(axis=0), arr.max(axis=0)
            mean, std = arr.mean(axis=0), arr.std(axis=0)
            if mode == "minmax":
                span = hi - lo
                flat = span < range_eps
                scale = np.where(flat, 1.0, 2.0 / np.where(flat, 1.0, span))
                offset = np.where(flat, -lo, -1.0 - scale * lo)
            else:
                safe_std = np.where(std < range_eps, 1.0, std)
                scale = 1.0 / safe_std
                offset = -mean / safe_std
            out.params[key].set(
                scale=scale, offset=offset, input_min=lo, input_max=hi, input_mean=mean, input_std=std
            )
        out.fitted.fill_(True)
        out._is_fitted = True
        return out

    # ------------------------------------------------------------------ inspection
    @property
    def keys(self) -> list[str]:
        return list(self._spec)

    @property
    def spec(self) -> dict[str, tuple[str, int]]:
        """``key -> (mode, feature_dim)``: enough to rebuild an unfitted twin for load_state_dict."""
        return dict(self._spec)

    @property
    def is_fitted(self) -> bool:
        return self._is_fitted

    def __contains__(self, key: object) -> bool:
        return key in self._spec

    def mode(self, key: str) -> str:
        return self._entry(key)[0]

    def first_difference(self, other: Normalizer) -> str | None:
        """The first state entry (e.g. ``params.action.scale``) whose value differs from `other`'s, or None.

        Two policies (teacher and student, weights to be averaged) can only be combined when they normalize
        alike; an entry only one of them has counts as a difference.
        """
        mine, theirs = self.state_dict(), other.state_dict()
        for name in sorted(mine.keys() | theirs.keys()):
            if name not in mine or name not in theirs or not torch.equal(mine[name], theirs[name]):
                return name
        return None

    def stats(self, key: str) -> dict[str, Tensor]:
        """Input statistics (min, max, mean, std) the key was fitted on, plus its scale and offset."""
        self._entry(key)
        params = self.params[key]
        return {name: getattr(params, name).clone() for name in ("scale", "offset", *_STAT_NAMES)}

    def _entry(self, key: str) -> tuple[str, int]:
        try:
            return self._spec[key]
        except (KeyError, TypeError):
            raise KeyError(f"normalizer has no key {key!r}; available keys: {self.keys}") from None

    def _params(self, key: str, x: Tensor) -> tuple[Tensor, Tensor]:
        mode, feature_dim = self._entry(key)
        if not self._is_fitted:
            raise RuntimeError("normalizer is not fitted: build it with Normalizer.fit or load a state_dict")
        if not isinstance(x, Tensor):
            raise TypeError(f"key {key!r}: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"key {key!r}: expected a floating-point tensor, got {x.dtype}")
        if mode in _DATA_MODES and (x.ndim == 0 or x.shape[-1] != feature_dim):
            raise ValueError(
                f"key {key!r}: last dimension must be {feature_dim}, got tensor of shape {tuple(x.shape)}"
            )
        params = self.params[key]
        return (
            params.scale.to(device=x.device, dtype=x.dtype),
            params.offset.to(device=x.device, dtype=x.dtype),
        )

    # ------------------------------------------------------------------ transforms
    def normalize(self, key: str, x: Tensor) -> Tensor:
        """Map raw values of ``key`` to the normalized space (same dtype/device as ``x``)."""
        scale, offset = self._params(key, x)
        return x * scale + offset

    def unnormalize(self, key: str, x: Tensor) -> Tensor:
        """Inverse of :meth:`normalize`."""
        scale, offset = self._params(key, x)
        return (x - offset) / scale

    def normalize_obs(self, obs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Normalize every entry of an observation dict; each key must be known to the normalizer."""
        return {key: self.normalize(key, value) for key, value in obs.items()}

    def extra_repr(self) -> str:
        entries = ", ".join(
            f"{k}: {m}" + (f"[{d}]" if m in _DATA_MODES else "") for k, (m, d) in self._spec.items()
        )
        return f"fitted={self._is_fitted}, {entries}"
