"""Push-T state demonstrations through LeRobot v3 and back: does a policy trained on the round trip match one
trained on the original store? (issue 28's acceptance; tests/test_formats_lerobot.py checks the data are
bit-identical and the first 20 training losses equal, this checks the trained policy.)

    python bench/lerobot_roundtrip.py data/pusht.zarr --out runs/lerobot-roundtrip [--identical-at N] \
        [--dry-run] [overrides...]

Exports the store to <out>/pusht_lerobot (LeRobot v3.0, 10 fps) and trains the preset (same seeds) once
from the store ("direct") and once from the LeRobot folder ("lerobot", imported by the trainer).

- Default: both trainings run to the end and their final evaluations (same evaluation seeds) are compared
  with bench/paired.py. Two full CPU trainings.
- `--identical-at N`: both trainings pause at step N (train.stop_at_step) and their checkpoints are
  compared tensor by tensor. Training is deterministic given its data, so identical weights at step N
  mean the round trip changed nothing training sees: only the direct run is then trained to the end and
  evaluated (its result is the LeRobot path's too). If any tensor differs, both run to the end and are
  compared as in the default. Saves one full training.

Extra arguments are dotted overrides for both runs.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path


def max_weight_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between two checkpoints' tensors (inf if their keys differ)."""
    from safetensors.numpy import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    if set(wa) != set(wb):
        return float("inf")
    return max(float(abs(wa[k].astype("float64") - wb[k].astype("float64")).max()) for k in wa)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "store", help="Push-T state EpisodeStore (diffpolicy collect --preset pusht_state_...)"
    )
    parser.add_argument("--out", default="runs/lerobot-roundtrip")
    parser.add_argument("--preset", default="pusht_state_unet_cpu")
    parser.add_argument("--identical-at", type=int, default=0, metavar="N")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    out = Path(args.out)
    folder = out / "pusht_lerobot"
    cli = [sys.executable, "-m", "diffpolicy.cli"]

    def run(command: list[str]) -> None:
        print("$", shlex.join(command), flush=True)
        if not args.dry_run:
            subprocess.run(command, check=True)

    def train(name: str, *extra: str) -> None:
        data = args.store if name == "direct" else str(folder)
        command = ["train", "--preset", args.preset, "--run-dir", str(out / name), f"data.path={data}"]
        run([*cli, *command, *args.overrides, *extra])

    if not folder.exists() or args.dry_run:
        run([*cli, "dataset", "convert", args.store, str(folder), "--fps", "10", "--task", "push the T"])
    names = ["direct", "lerobot"]
    if args.identical_at:
        for name in names:
            train(name, f"train.stop_at_step={args.identical_at}")
        if args.dry_run:
            return 0
        diff = max_weight_difference(*(out / n / "checkpoints" / "latest" for n in names))
        print(f"step {args.identical_at}: largest weight difference direct vs lerobot = {diff:g}")
        if diff == 0.0:
            print("identical: training only the direct run to the end (its result is the LeRobot path's)")
            names = ["direct"]
    for name in names:
        train(name)
    if len(names) == 2:
        reports = [str(out / name / "eval" / "report.json") for name in names]
        run([sys.executable, str(Path(__file__).parent / "paired.py"), *reports])
    return 0


if __name__ == "__main__":
    sys.exit(main())
