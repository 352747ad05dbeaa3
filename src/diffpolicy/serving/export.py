"""Export a diffusion policy to TorchScript: observation encoder and noise network as traced modules,
with the sampling loop kept in Python around them (the diffusers scheduler the policy samples with).

    <export>/             `diffpolicy export`: <checkpoint>-torchscript beside the checkpoint, or --out
      encoder.pt          TorchScript: obs tensors (in `obs_keys` order) -> the noise net's condition
                          (normalization included)
      noise_net.pt        TorchScript: (sample (B, H, Da), timestep (0-d long), condition) -> net output
      unnormalize.pt      TorchScript: normalized action chunk -> environment units
      scheduler_config.json  the diffusers scheduler (class, betas, spacing, clipping) sampling uses
      export.json         shape_meta, obs_keys, n_obs_steps, horizon, n_action_steps, steps, noise scale

Why TorchScript and not ONNX: `torch.jit.trace` ships with torch (no exporter or runtime to install),
the traced graph runs the same kernels (outputs equal eager PyTorch bit for bit on CPU in the tests;
the stated tolerance is 1e-5 absolute on actions), and the files load in C++ (libtorch) as well as in
Python. torch 2.14 marks torch.jit deprecated in favour of torch.export, which today stops on the
normalizer's data-dependent checks with a dynamic batch; ONNX export goes through torch.export too.
The sampling loop stays outside because the schedulers are diffusers' (a traced loop would freeze the
number of steps and the sampler). Supported: DiffusionPolicy with global observation conditioning (every
preset), U-Net or transformer; not the inpainting variant (policy.obs_as_global_cond=false) and not
consistency students.
"""

from __future__ import annotations

import json
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import diffusers
import torch
from torch import nn

from diffpolicy.files import fsync_dir, make_temp_dir
from diffpolicy.policy import DiffusionPolicy


@contextmanager
def _quiet_jit():
    """torch 2.14 marks torch.jit deprecated (FutureWarning), and tracing warns at every Python shape check
    (TracerWarning); both are expected here: the traced graphs are checked against eager in the tests."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


FILES = ("encoder.pt", "noise_net.pt", "unnormalize.pt", "scheduler_config.json", "export.json")


class _Encoder(nn.Module):
    def __init__(self, policy: DiffusionPolicy, keys: list[str]) -> None:
        super().__init__()
        self.policy, self.keys = policy, keys

    def forward(self, *obs: torch.Tensor) -> torch.Tensor:
        return self.policy.global_cond(self.policy.encode_obs(dict(zip(self.keys, obs, strict=True))))


class _NoiseNet(nn.Module):
    def __init__(self, policy: DiffusionPolicy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, sample: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.policy.call_net(sample, t, cond)


class _Unnormalize(nn.Module):
    def __init__(self, policy: DiffusionPolicy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.policy.normalizer.unnormalize("action", x)


def example_obs(shape_meta: dict[str, Any], n_obs_steps: int, batch: int = 2) -> dict[str, torch.Tensor]:
    """Random observations of the policy's shapes (images in [0, 1]), for tracing and checks."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for key, meta in shape_meta["obs"].items():
        x = torch.rand(batch, n_obs_steps, *meta["shape"], generator=g)
        out[key] = x if meta.get("type") == "rgb" else 2 * x - 1
    return out


def export_policy(policy: DiffusionPolicy, out: str | Path, overwrite: bool = False) -> Path:
    """Trace `policy`'s encoder, noise net and action unnormalization into TorchScript files under `out`.

    The files are written to a temporary folder beside `out` and renamed into place, so a failed export
    leaves `out` as it was. An `out` that holds files is refused (FileExistsError), except an earlier
    export when `overwrite` is set."""
    if type(policy) is not DiffusionPolicy:
        raise ValueError(f"export supports DiffusionPolicy, not {type(policy).__name__}")
    if not policy.cfg.obs_as_global_cond:
        raise ValueError("export supports global observation conditioning only (policy.obs_as_global_cond)")
    if getattr(policy, "precision", "fp32") != "fp32":
        raise ValueError("export traces fp32 networks; export before choosing bf16")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (out / "export.json").is_file():
            raise FileExistsError(
                f"{out} exists and is not a diffpolicy export: choose a new or empty folder (nothing was "
                "written)"
            )
        if not overwrite:
            raise FileExistsError(f"{out} already holds an export: --overwrite (overwrite=True) replaces it")
    tmp = make_temp_dir(out.parent, f".{out.name}.tmp-")
    try:
        _write_export(policy, tmp)
        if out.exists():
            old = make_temp_dir(out.parent, f".{out.name}.old-")
            out.rename(old / out.name)
            try:
                tmp.rename(out)
            except OSError:
                (old / out.name).rename(out)  # the earlier export stays
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_export(policy: DiffusionPolicy, out: Path) -> None:
    """The export files of `policy` in the existing folder `out`."""
    policy = policy.eval()
    keys = list(policy.shape_meta["obs"])
    obs = example_obs(policy.shape_meta, policy.n_obs_steps)
    with torch.inference_mode(False), torch.no_grad(), _quiet_jit():
        obs = {k: v.to(policy.device) for k, v in obs.items()}
        encoder = torch.jit.trace(_Encoder(policy, keys), tuple(obs[k] for k in keys), check_trace=False)
        cond = encoder(*(obs[k] for k in keys))
        sample = torch.randn(cond.shape[0], policy.horizon, policy.action_dim, device=policy.device)
        t = torch.tensor(10, device=policy.device)
        net = torch.jit.trace(_NoiseNet(policy), (sample, t, cond), check_trace=False)
        unnormalize = torch.jit.trace(_Unnormalize(policy), (sample,), check_trace=False)
    encoder.save(str(out / "encoder.pt"))
    net.save(str(out / "noise_net.pt"))
    unnormalize.save(str(out / "unnormalize.pt"))
    policy.sampler.save_config(out)
    meta = {
        "format": "diffpolicy-torchscript/1",
        "shape_meta": policy.shape_meta,
        "obs_keys": keys,
        "n_obs_steps": policy.n_obs_steps,
        "horizon": policy.horizon,
        "n_action_steps": policy.n_action_steps,
        "action_dim": policy.action_dim,
        "num_inference_steps": policy.num_inference_steps,
        "noise_scale": float(getattr(policy, "noise_scale", 1.0)),
    }
    (out / "export.json").write_text(json.dumps(meta, indent=2))


class ExportedPolicy:
    """Loads an export folder and samples chunks like DiffusionPolicy.predict_action (same generator draws,
    same scheduler): usable wherever a policy is, e.g. RecedingHorizonController."""

    training = False

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        path = Path(path)
        missing = [f for f in FILES if not (path / f).exists()]
        if missing:
            raise FileNotFoundError(f"{path} is not a diffpolicy export: missing {missing}")
        meta = json.loads((path / "export.json").read_text())
        self.shape_meta = meta["shape_meta"]
        self.obs_keys: list[str] = meta["obs_keys"]
        self.n_obs_steps, self.horizon = int(meta["n_obs_steps"]), int(meta["horizon"])
        self.n_action_steps, self.action_dim = int(meta["n_action_steps"]), int(meta["action_dim"])
        self.num_inference_steps, self.noise_scale = int(meta["num_inference_steps"]), meta["noise_scale"]
        self.device = torch.device(device)
        with _quiet_jit():
            self.encoder = torch.jit.load(str(path / "encoder.pt"), map_location=self.device)
            self.net = torch.jit.load(str(path / "noise_net.pt"), map_location=self.device)
            self.unnormalize = torch.jit.load(str(path / "unnormalize.pt"), map_location=self.device)
        config = json.loads((path / "scheduler_config.json").read_text())
        self.sampler = getattr(diffusers, config["_class_name"]).from_config(config)

    def eval(self) -> ExportedPolicy:
        return self

    def encode(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The noise net's condition from {key: (B, >= n_obs_steps, *shape)}."""
        return self.encoder(
            *(obs[k][:, -self.n_obs_steps :].to(self.device, torch.float32) for k in self.obs_keys)
        )

    @torch.inference_mode()
    def predict_action(
        self, obs: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """{"action": (B, n_action_steps, Da), "action_pred": (B, horizon, Da)}, as the PyTorch policy."""
        cond = self.encode(obs)
        shape = (cond.shape[0], self.horizon, self.action_dim)
        sample = self.noise_scale * torch.randn(
            shape, device=self.device, dtype=cond.dtype, generator=generator
        )
        self.sampler.set_timesteps(self.num_inference_steps, device=self.device)
        for t in self.sampler.timesteps:
            out = self.net(sample, t, cond)
            sample = self.sampler.step(out, t, sample, generator=generator).prev_sample
        action_pred = self.unnormalize(sample)
        if not torch.isfinite(action_pred).all():
            raise RuntimeError("the exported policy produced non-finite actions")
        start = self.n_obs_steps - 1
        return {"action": action_pred[:, start : start + self.n_action_steps], "action_pred": action_pred}
