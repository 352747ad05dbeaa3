"""Print our/their ratios from `diffpolicy bench` JSON and `bench/lerobot_compare.py` JSON.

Runs with any Python 3.10+ (standard library only):

    python bench/ratios.py ours.json theirs.json [--preset pusht_image_unet] [--markdown ratios.md]

For times (ms) a ratio below 1 means ours is faster; for throughput (samples/s) above 1 means ours is faster.
Warns when the two runs are not comparable (parameter count, batch size, device, thread count).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

METRICS = (
    "train_step_ms",
    "train_samples_per_s",
    "chunk_ms[ddpm-100]",
    "per_action_ms[ddpm-100]",
    "chunk_ms[ddim-10]",
    "per_action_ms[ddim-10]",
    "peak_memory_mb",
)


def pick_row(result: dict[str, Any], preset: str | None) -> dict[str, Any]:
    """The row for `preset`, or the only row."""
    rows = result["rows"]
    if preset is not None:
        matches = [r for r in rows if r["preset"] == preset]
        if matches:
            return matches[0]
    if len(rows) == 1:
        return rows[0]
    raise SystemExit(f"pick a row with --preset: found {[r['preset'] for r in rows]}")


def param_count(row: dict[str, Any]) -> int:
    """Exact parameter count (ours stores only params_m = count / 1e6, exact after rounding)."""
    return int(row["params"]) if "params" in row else round(row["params_m"] * 1e6)


def warnings(ours: dict[str, Any], theirs: dict[str, Any], o: dict, t: dict) -> list[str]:
    """Reasons the two runs may not be comparable."""
    out = []
    if param_count(o) != param_count(t):
        out.append(f"parameter counts differ: ours {param_count(o):,} vs theirs {param_count(t):,}")
    if t.get("optimizer", "ours") != "ours":
        out.append(f"LeRobot's step used its own optimizer preset ({t['optimizer']}), ours uses AdamW")
    for key in ("batch_size", "device"):
        if o.get(key) != t.get(key):
            out.append(f"{key} differs: ours {o.get(key)} vs theirs {t.get(key)}")
    for key in ("threads", "torch"):
        a, b = ours["machine"].get(key), theirs["machine"].get(key)
        if a != b:
            out.append(f"{key} differs: ours {a} vs theirs {b}")
    for key in ("warmup", "repeats"):
        if ours.get(key) != theirs.get(key):
            out.append(f"{key} differs: ours {ours.get(key)} vs theirs {theirs.get(key)}")
    return out


def ratio_table(o: dict[str, Any], t: dict[str, Any]) -> str:
    """Markdown table of ours, theirs and ours/theirs per metric both rows have."""
    lines = ["| metric | ours | LeRobot | ours/LeRobot | faster |", "|---|---|---|---|---|"]
    for key in METRICS:
        if key not in o or key not in t:
            continue
        a, b = float(o[key]), float(t[key])
        ratio = a / b if b else float("nan")
        if key == "peak_memory_mb":
            verdict = "-"
        elif key.endswith("_per_s"):
            verdict = "ours" if ratio > 1 else "LeRobot"
        else:
            verdict = "ours" if ratio < 1 else "LeRobot"
        lines.append(f"| {key} | {a:.4g} | {b:.4g} | {ratio:.3f} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: print the ratio table and any comparability warnings."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ours", help="JSON from `diffpolicy bench --out`")
    ap.add_argument("theirs", help="JSON from bench/lerobot_compare.py --out")
    ap.add_argument("--preset", default="pusht_image_unet", help="row of ours.json to compare")
    ap.add_argument("--markdown", help="also write the table (and warnings) to this file")
    args = ap.parse_args(argv)
    ours, theirs = (json.loads(Path(p).read_text()) for p in (args.ours, args.theirs))
    o, t = pick_row(ours, args.preset), pick_row(theirs, None)
    om, tm = ours["machine"], theirs["machine"]
    header = (
        f"ours: {o['preset']} (torch {om.get('torch')}, {om.get('threads')} threads); "
        f"LeRobot {tm.get('lerobot')} (torch {tm.get('torch')}, {tm.get('threads')} threads); "
        f"params {param_count(o):,} vs {param_count(t):,}; "
        f"batch {o.get('batch_size')}; device {o.get('device')}"
    )
    text = header + "\n\n" + ratio_table(o, t)
    notes = warnings(ours, theirs, o, t)
    if notes:
        text += "\n\n" + "\n".join(f"WARNING: {n}" for n in notes)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
