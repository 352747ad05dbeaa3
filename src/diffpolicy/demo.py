"""`diffpolicy demo`: the first-time user's end-to-end run, on CPU in a few minutes.

Collects expert demonstrations of the multimodal trajectory2d task, trains a Diffusion Policy and an
MSE behaviour-cloning baseline with the same network and budget, evaluates both in closed loop on
unseen seeds, and writes one report comparing them (plots included).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from diffpolicy.collect import collect
from diffpolicy.config import collect_counts, load_config
from diffpolicy.data.episodes import EpisodeStore, EpisodeStoreError
from diffpolicy.training.trainer import RunFinished, Trainer

MIN_MODE_FRACTION = 0.25  # the diffusion policy must follow each mode in at least this share of rollouts
MAX_BASELINE_FOLLOW = 0.10  # the MSE baseline "does not stay on either path": follows in at most this share


def acceptance(diffusion: dict[str, Any], baseline: dict[str, Any]) -> list[tuple[str, bool]]:
    """The demo's checks, as (description, passed) rows."""
    d, b = diffusion["task_metrics"], baseline["task_metrics"]
    if "forward_fraction" not in d:  # not the multimodal toy: just compare success
        return [
            (
                "diffusion succeeds more often than MSE-BC",
                diffusion["success_rate"] > baseline["success_rate"],
            )
        ]
    follow_b = b["forward_fraction"] + b["reverse_fraction"]
    return [
        (
            f"diffusion follows the forward mode in >= {MIN_MODE_FRACTION:.0%} of rollouts "
            f"({d['forward_fraction']:.0%})",
            d["forward_fraction"] >= MIN_MODE_FRACTION,
        ),
        (
            f"diffusion follows the reverse mode in >= {MIN_MODE_FRACTION:.0%} of rollouts "
            f"({d['reverse_fraction']:.0%})",
            d["reverse_fraction"] >= MIN_MODE_FRACTION,
        ),
        (
            f"diffusion mean distance to the path < {d['close_mean_distance']} "
            f"({d['mean_distance_to_path']:.4f})",
            d["mean_distance_to_path"] < d["close_mean_distance"],
        ),
        (
            f"MSE-BC stays on a path in <= {MAX_BASELINE_FOLLOW:.0%} of rollouts ({follow_b:.0%})",
            follow_b <= MAX_BASELINE_FOLLOW,
        ),
    ]


def run_demo(
    out: Path,
    preset: str = "trajectory2d_lowdim_unet",
    overrides: list[str] | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    overrides = list(overrides or [])
    base = load_config(preset, overrides)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    demos = out / "demos.zarr"
    t0 = time.perf_counter()
    try:
        store = EpisodeStore.open(demos)
        if store.n_episodes < sum(collect_counts(base.collect)):
            raise EpisodeStoreError("incomplete")
    except (FileNotFoundError, EpisodeStoreError):
        if demos.exists():  # an interrupted collection of our own: start it again
            shutil.rmtree(demos)
        collect(base, demos, progress=progress is not False)
    timings["collect_s"] = time.perf_counter() - t0

    reports = {}
    for kind in ("diffusion", "mse_bc"):
        cfg = load_config(
            preset, overrides + [f"policy.type={kind}", f"data.path={demos}", f"name={base.name}-{kind}"]
        )
        t0 = time.perf_counter()
        try:
            reports[kind] = Trainer(cfg, out / kind, show_progress=progress).fit()
        except RunFinished:  # a rerun of the demo: the finished run's own final evaluation
            reports[kind] = json.loads((out / kind / "eval" / "report.json").read_text())
        if reports[kind].get("interrupted"):  # Ctrl-C / SIGTERM: the run saved; rerunning the demo resumes it
            raise KeyboardInterrupt
        timings[f"{kind}_train_and_eval_s"] = time.perf_counter() - t0

    checks = acceptance(reports["diffusion"], reports["mse_bc"])
    report_path = out / "report.md"
    report_path.write_text(demo_markdown(base.name, reports, checks, timings, out))
    result = {
        "report": str(report_path),
        "passed": all(ok for _, ok in checks),
        "timings": timings,
        "checks": checks,
        "reports": {k: {kk: vv for kk, vv in r.items() if kk != "episodes"} for k, r in reports.items()},
    }
    with open(out / "demo.json", "w") as f:
        json.dump(result, f, indent=2, default=str)
    return result


def demo_markdown(
    name: str, reports: dict[str, dict], checks: list[tuple[str, bool]], timings: dict[str, float], out: Path
) -> str:
    keys = ["success_rate", "mean_max_reward", "mean_episode_length"]
    task_keys = [k for k, v in reports["diffusion"]["task_metrics"].items() if isinstance(v, float)]
    lines = [
        f"# diffpolicy demo: {name}",
        "",
        f"Closed-loop evaluation on {reports['diffusion']['n_episodes']} unseen seeds "
        f"({reports['diffusion']['seeds'][0]}..{reports['diffusion']['seeds'][-1]}).",
        "",
        "| metric | diffusion | mse_bc |",
        "|---|---|---|",
    ]
    for k in keys:
        lines.append(f"| {k} | {reports['diffusion'][k]:.3f} | {reports['mse_bc'][k]:.3f} |")
    for k in task_keys:
        lines.append(
            f"| {k} | {reports['diffusion']['task_metrics'][k]:.4f} | "
            f"{reports['mse_bc']['task_metrics'][k]:.4f} |"
        )
    lines += ["", "## Checks", ""] + [f"- [{'x' if ok else ' '}] {text}" for text, ok in checks]
    lines += ["", "## Rollouts", ""]
    for kind, r in reports.items():
        plot = r["task_metrics"].get("plot")
        if plot:
            lines.append(f"**{kind}**\n\n![{kind}]({Path(plot).relative_to(out)})\n")
        lines.append(f"![{kind} training]({kind}/training_curves.png)\n")
    lines += ["## Time", ""] + [f"- {k}: {v:.1f}" for k, v in timings.items()]
    return "\n".join(lines) + "\n"
