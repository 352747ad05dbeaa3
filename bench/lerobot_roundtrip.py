"""Push-T state demonstrations through LeRobot v3 and back: does a policy trained on the round trip match one
trained on the original store? (issue 28's acceptance; tests/test_formats_lerobot.py checks the data are
bit-identical and the first 20 training losses equal, this checks closed-loop success.)

    python bench/lerobot_roundtrip.py data/pusht.zarr --out runs/lerobot-roundtrip [--dry-run] [overrides...]

Exports the store to <out>/pusht_lerobot (LeRobot v3.0, 10 fps), trains the `pusht_state_transformer_cpu`
preset (same seeds) once from the store and once from the LeRobot folder (imported by the trainer), and
compares the two final evaluations on the same evaluation seeds with bench/paired.py. Two CPU trainings of
about 50 minutes each on 2 cores. Extra arguments are dotted overrides for both runs.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "store", help="Push-T state EpisodeStore (diffpolicy collect --preset pusht_state_...)"
    )
    parser.add_argument("--out", default="runs/lerobot-roundtrip")
    parser.add_argument("--preset", default="pusht_state_transformer_cpu")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    out = Path(args.out)
    folder = out / "pusht_lerobot"
    cli = [sys.executable, "-m", "diffpolicy.cli"]
    commands = [[*cli, "dataset", "convert", args.store, str(folder), "--fps", "10", "--task", "push the T"]]
    for name, data in (("direct", args.store), ("lerobot", str(folder))):
        run = ["train", "--preset", args.preset, "--run-dir", str(out / name), f"data.path={data}"]
        commands.append([*cli, *run, *args.overrides])
    reports = [str(out / name / "eval" / "report.json") for name in ("direct", "lerobot")]
    commands.append([sys.executable, str(Path(__file__).parent / "paired.py"), *reports])
    for command in commands:
        print("$", shlex.join(command), flush=True)
        if not args.dry_run and not (command[3:5] == ["dataset", "convert"] and folder.exists()):
            subprocess.run(command, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
