"""`diffpolicy bench`: speed of training steps and action chunks, per preset and sampler, on CPU or CUDA.

Numbers are medians over repeated runs after warm-up. Nothing here asserts on time: it prints a table and
writes JSON so results can be compared across machines, commits and libraries.

- train step: forward + backward + AdamW step on a synthetic batch of the preset's shapes (no data
  loading), reported as ms/step and samples/s; with `data=STORE` also the time to load one batch from
  that EpisodeStore (SequenceDataset + DataLoader, as the trainer reads it) and the step including it;
- fresh chunk: observation window -> action chunk (`predict_action`, batch 1), per sampler setting;
  amortized per action: that latency divided by n_action_steps;
- peak memory: CUDA max allocated, or the process's peak RSS on CPU.

Fast paths come from the preset's config, so overrides select them: `train.mixed_precision=bf16` (the
training step under bf16 autocast), `eval.precision=bf16` and `eval.compile=reduce-overhead` (chunks with
bf16 network calls / torch.compile, CUDA graphs on GPU). Warm-up calls absorb compilation.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from diffpolicy.config import RunConfig, load_config
from diffpolicy.data.normalize import Normalizer
from diffpolicy.policy import make_policy, normalizer_spec
from diffpolicy.training.optim import make_optimizer
from diffpolicy.training.trainer import make_dataset, resolve_device, to_device

DEFAULT_SAMPLERS = (("ddpm", 100), ("ddim", 10))
FLOW_BENCH_SAMPLERS = (("euler", 1), ("euler", 2), ("euler", 4), ("heun", 2))  # a FlowPolicy's default rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of fn() in milliseconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def synthetic_obs(shape_meta: dict[str, Any], batch: int, steps: int, device: torch.device) -> dict:
    obs = {}
    for key, meta in shape_meta["obs"].items():
        shape = (batch, steps, *meta["shape"])
        obs[key] = torch.rand(shape, device=device)  # images in [0, 1]; low-dim values arbitrary
    return obs


def build_policy(cfg: RunConfig, shape_meta: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """A policy of the preset's architecture with a normalizer fitted to random data (weights random)."""
    policy = make_policy(cfg.policy, shape_meta)
    spec = normalizer_spec(shape_meta, cfg.policy.normalization)
    data = {k: torch.randn(256, dim) for k, (mode, dim) in spec.items() if mode in ("minmax", "gaussian")}
    fitted = Normalizer.fit(data, {k: mode for k, (mode, _) in spec.items()})
    policy.normalizer.load_state_dict(fitted.state_dict())
    return policy.to(device)


def real_batches(cfg: RunConfig, shape_meta: dict[str, Any], store: str, batch_size: int) -> Iterator[dict]:
    """Endless shuffled training batches from an EpisodeStore, read the way the trainer reads them."""
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    dataset = make_dataset(cfg, store, shape_meta)
    batches = BatchSampler(RandomSampler(dataset), batch_size, drop_last=True)
    loader = DataLoader(
        dataset,
        sampler=batches,  # index lists, gathered a batch at a time as the trainer does
        batch_size=None,
        num_workers=cfg.train.num_workers,
        persistent_workers=cfg.train.num_workers > 0,
    )
    while True:
        yield from loader


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def bench_preset(
    preset: str,
    device: torch.device,
    batch_size: int | None = None,
    samplers: tuple[tuple[str, int], ...] | None = None,
    warmup: int = 2,
    repeats: int = 5,
    overrides: list[str] | None = None,
    data: str | None = None,
) -> dict[str, Any]:
    """One table row: train-step and chunk timings for `preset` (and data loading when `data` is set);
    `samplers` default to DDPM-100 and DDIM-10, or Euler 1 / 2 / 4 and Heun 2 for a flow-matching policy."""
    cfg = load_config(preset, overrides or [])
    from diffpolicy.tasks import make_task

    shape_meta = make_task(cfg.task.name, **cfg.task.kwargs).shape_meta()
    policy = build_policy(cfg, shape_meta, device)
    p = cfg.policy
    B = batch_size or cfg.train.batch_size
    row: dict[str, Any] = {
        "preset": preset,
        "device": str(device),
        "params_m": sum(x.numel() for x in policy.parameters()) / 1e6,
        "batch_size": B,
    }
    batch = {
        "obs": synthetic_obs(shape_meta, B, p.n_obs_steps, device),
        "action": torch.randn(B, p.horizon, policy.action_dim, device=device),
        "action_is_pad": torch.zeros(B, p.horizon, dtype=torch.bool, device=device),
    }
    optimizer = make_optimizer(policy.optim_groups(cfg.train), cfg.train, device)
    policy.train()

    bf16_train = cfg.train.mixed_precision == "bf16"

    def train_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_train):
            loss = policy.compute_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    ms = median_ms(train_step, device, warmup, repeats)
    row["train_step_ms"] = ms
    row["train_samples_per_s"] = B / ms * 1000
    if data:
        batches = real_batches(cfg, shape_meta, data, B)

        def load() -> None:
            batch.update(to_device(next(batches), device))

        def load_and_step() -> None:
            load()
            train_step()

        row["load_batch_ms"] = median_ms(load, device, warmup, repeats)
        # measured, not summed: DataLoader workers (train.num_workers > 0) overlap loading with the step
        with_data_ms = median_ms(load_and_step, device, warmup, repeats)
        row["train_step_with_data_ms"] = with_data_ms
        row["train_samples_per_s_with_data"] = B / with_data_ms * 1000
    policy.eval()
    if hasattr(policy, "set_fast_paths"):  # eval.precision / eval.compile, as `diffpolicy eval` runs them
        policy.set_fast_paths(cfg.eval.precision, cfg.eval.compile)
    row["train_precision"] = cfg.train.mixed_precision
    row["precision"], row["compile"] = cfg.eval.precision, cfg.eval.compile or "no"
    obs1 = synthetic_obs(shape_meta, 1, p.n_obs_steps, device)
    if samplers is None:
        samplers = FLOW_BENCH_SAMPLERS if p.objective == "flow" else DEFAULT_SAMPLERS
    for sampler, steps in samplers if hasattr(policy, "set_sampler") else (("regression", 1),):
        if hasattr(policy, "set_sampler"):
            policy.set_sampler(sampler, steps)
        chunk_ms = median_ms(lambda: policy.predict_action(obs1), device, warmup, repeats)
        row[f"chunk_ms[{sampler}-{steps}]"] = chunk_ms
        row[f"per_action_ms[{sampler}-{steps}]"] = chunk_ms / p.n_action_steps
    row["peak_memory_mb"] = peak_memory_mb(device)
    return row


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def format_table(rows: list[dict[str, Any]]) -> str:
    keys = sorted({k for r in rows for k in r if k not in ("preset", "device")})
    keys = ["params_m", "batch_size", "train_step_ms", "train_samples_per_s"] + [
        k for k in keys if k not in ("params_m", "batch_size", "train_step_ms", "train_samples_per_s")
    ]
    header = "| preset | device | " + " | ".join(keys) + " |"
    lines = [header, "|" + "---|" * (len(keys) + 2)]
    for r in rows:
        cells = [f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        lines.append(f"| {r['preset']} | {r['device']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_bench(
    presets: list[str],
    device_name: str = "auto",
    batch_size: int | None = None,
    warmup: int = 2,
    repeats: int = 5,
    out: str | Path | None = None,
    overrides: list[str] | None = None,
    data: str | None = None,
) -> dict[str, Any]:
    """Bench each preset, print the table, write JSON to `out`; `data` adds data-loading timings."""
    device = resolve_device(device_name)
    rows = [
        bench_preset(p, device, batch_size, warmup=warmup, repeats=repeats, overrides=overrides, data=data)
        for p in presets
    ]
    result = {"machine": machine_info(device), "warmup": warmup, "repeats": repeats, "rows": rows}
    print(format_table(rows))
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    return result
