#!/usr/bin/env bash
# A diffpolicy SO-101 grasp checkpoint driving the simulated SO-101 (robot type so101_follower_sim) through
# `lerobot-rollout --strategy.type=episodic` (LeRobot 0.6.1's lerobot-record loop with a policy): N whole
# episodes recorded as a LeRobot dataset in OUT/dataset, each episode's outcome in OUT/robot_results.jsonl,
# and the success rate the simulated robot logs. Optionally (COMPARE=1) `diffpolicy eval` on the same seeds.
#
#   bash bench/lerobot_so101_rollout.sh CHECKPOINT OUT [N=10] [SEED=0] [N_OBJECTS=1]
#   EPISODE_TIME_S=120 RESET_TIME_S=2 COMPARE=1 bash bench/lerobot_so101_rollout.sh ...
#
# Episode k of the robot uses seed SEED + k, as `diffpolicy eval eval.seed=SEED` does. A state checkpoint
# observes the privileged object poses: the robot then adds them to observation.state
# (--robot.privileged_state=true) and the policy reads all three keys from there (--policy.feature_map).
# EPISODE_TIME_S must cover the task's step limit (15 / 20 / 25 s of 30 Hz steps for 1 / 2 / 3 objects) at
# this machine's speed, or the robot counts the episode as cut short (a failure, with a warning).
# Runs in the LeRobot environment of scripts/lerobot-plugin-env.sh (VENV, default /work/lerobot-venv). The
# checkpoint's config.yaml and model.safetensors are copied to OUT/checkpoint and exported there.
set -euo pipefail

CKPT="$1"
OUT="$2"
N="${3:-10}"
SEED="${4:-0}"
N_OBJECTS="${5:-1}"
VENV="${VENV:-/work/lerobot-venv}"
RUN=(nice -n 19 env OMP_NUM_THREADS=1 MUJOCO_GL=egl)

if [ -e "$OUT/dataset" ] || [ -e "$OUT/robot_results.jsonl" ]; then
  echo "$OUT already holds a rollout (dataset / robot_results.jsonl): choose another OUT" >&2
  exit 1
fi
mkdir -p "$OUT/checkpoint"
cp "$CKPT/config.yaml" "$CKPT/model.safetensors" "$OUT/checkpoint/"
"$VENV/bin/diffpolicy-lerobot-export" "$OUT/checkpoint" --device cpu

# the run config sits under "run" in a checkpoint's config.yaml
OBS_TYPE="$("$VENV/bin/python" -c 'import sys, yaml; c = yaml.safe_load(open(sys.argv[1])); k = c.get("run", c)["task"]["kwargs"]; print(k.get("obs_type", "state"))' "$OUT/checkpoint/config.yaml")"
ROBOT=(--robot.type=so101_follower_sim --robot.n_objects="$N_OBJECTS" --robot.seed="$SEED"
  --robot.results_path="$OUT/robot_results.jsonl")
POLICY=(--policy.path="$OUT/checkpoint" --policy.device=cpu)
if [ "$OBS_TYPE" = state ]; then
  ROBOT+=(--robot.privileged_state=true --robot.camera_names='[]')
  POLICY+=(--policy.feature_map='{"state": "observation.state", "object_pose": "observation.state", "container_pos": "observation.state"}')
else
  SHAPE="$("$VENV/bin/python" -c 'import sys, yaml; c = yaml.safe_load(open(sys.argv[1])); k = c.get("run", c)["task"]["kwargs"]; s = k.get("image_shape", [240, 320]); print(s[0], s[1], ",".join(k.get("cameras", ["top", "side"])))' "$OUT/checkpoint/config.yaml")"
  read -r H W CAMS <<<"$SHAPE"
  ROBOT+=(--robot.image_height="$H" --robot.image_width="$W" --robot.camera_names="[$CAMS]")
fi

start=$(date +%s)
"${RUN[@]}" "$VENV/bin/lerobot-rollout" --strategy.type=episodic "${ROBOT[@]}" "${POLICY[@]}" \
  --dataset.repo_id=local/rollout_so101sim --dataset.root="$OUT/dataset" \
  --dataset.single_task="put the objects into the container" --dataset.num_episodes="$N" \
  --dataset.episode_time_s="${EPISODE_TIME_S:-120}" --dataset.reset_time_s="${RESET_TIME_S:-2}" \
  --dataset.push_to_hub=false --fps=30 --play_sounds=false --display_data=false \
  --return_to_initial_position=false 2>&1 | tee "$OUT/rollout.log"
end=$(date +%s)

if [ -n "${COMPARE:-}" ]; then
  "${RUN[@]}" "$VENV/bin/diffpolicy" eval --checkpoint "$OUT/checkpoint" --episodes "$N" --out "$OUT/diffpolicy" \
    eval.seed="$SEED" eval.n_envs=1 eval.n_videos=0 task.kwargs.n_objects="$N_OBJECTS"
fi

"$VENV/bin/python" - "$OUT" "$((end - start))" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [json.loads(line) for line in (out / "robot_results.jsonl").read_text().splitlines()]
info = json.loads((out / "dataset" / "meta" / "info.json").read_text())
wins = sum(r["success"] for r in rows)
print(f"lerobot-rollout on so101_follower_sim: success {wins}/{len(rows)} ({sys.argv[2]} s); "
      f"dataset {out / 'dataset'}: {info['total_episodes']} episodes, {info['total_frames']} frames")
print("cut short (episode_time_s too short):", sum(r["reason"] == "cut_short" for r in rows))
report = out / "diffpolicy" / "report.json"
if report.exists():
    ours = json.loads(report.read_text())
    print(f"diffpolicy eval, same seeds: success {ours['success_rate']:.3f} over {ours['n_episodes']} episodes")
EOF
