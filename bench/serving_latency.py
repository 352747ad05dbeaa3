"""Latency of one fresh action chunk (batch 1, CPU): eager PyTorch vs the TorchScript export vs the same
policy through `diffpolicy serve` on loopback, with the exported chunk's largest difference from eager.

Policies have the presets' architectures with random weights (latency does not depend on training).
Prints a markdown table; never asserts on time.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/serving_latency.py --repeats 5 --samplers ddim:10 ddpm:100
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from diffpolicy.bench import build_policy, median_ms, synthetic_obs
from diffpolicy.config import load_config
from diffpolicy.serving.client import PolicyClient
from diffpolicy.serving.export import ExportedPolicy, export_policy
from diffpolicy.serving.server import PolicyServer
from diffpolicy.tasks import make_task

PRESETS = {
    "pusht_state_unet": [],
    "pusht_image_unet_cpu (compact fp32)": ["policy.vision.backbone=compact", "policy.vision.precision=fp32"],
}


def row(policy: torch.nn.Module, obs: dict[str, torch.Tensor], repeats: int, prefix: str) -> str:
    """One table row: eager, TorchScript and served latency of `policy` on `obs`, and the export's error."""
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        exported = ExportedPolicy(export_policy(policy, tmp))

    def chunk(p: object) -> torch.Tensor:
        return p.predict_action(obs, torch.Generator().manual_seed(0))["action_pred"]

    diff = (chunk(policy) - chunk(exported)).abs().max().item()
    eager = median_ms(lambda: chunk(policy), cpu, 1, repeats)
    script = median_ms(lambda: chunk(exported), cpu, 1, repeats)
    np_obs = {k: v.numpy() for k, v in obs.items()}
    with PolicyServer(policy, batch_window_ms=0.0) as server, PolicyClient(server.address) as client:
        replies = [client.predict(np_obs) for _ in range(repeats + 1)][1:]
    server_ms = sorted(r.latency["server_ms"] for r in replies)[len(replies) // 2]
    round_ms = sorted(r.latency["roundtrip_ms"] for r in replies)[len(replies) // 2]
    return f"{prefix} {eager:.1f} | {script:.1f} | {server_ms:.1f} / {round_ms:.1f} | {diff:.2g} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samplers", nargs="*", default=["ddim:10", "ddpm:100"])
    args = parser.parse_args()
    cpu = torch.device("cpu")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch 1, median of {args.repeats}"
    )
    print("| policy | sampler | eager ms | TorchScript ms | served ms (server / roundtrip) | max abs diff |")
    print("|---|---|---|---|---|---|")
    for label, overrides in PRESETS.items():
        cfg = load_config(label.split()[0], overrides)
        meta = make_task(cfg.task.name, **cfg.task.kwargs).shape_meta()
        policy = build_policy(cfg, meta, cpu).eval()
        obs = synthetic_obs(meta, 1, policy.n_obs_steps, cpu)
        for spec in args.samplers:
            sampler, steps = spec.split(":")
            policy.set_sampler(sampler, int(steps))
            print(row(policy, obs, args.repeats, f"| {label} | {sampler} {steps} |"), flush=True)


if __name__ == "__main__":
    main()
