#!/usr/bin/env bash
# The same Push-T checkpoint evaluated by `diffpolicy eval` and by `lerobot-eval` through the plugin, on the
# same seeds (both start gym-pusht from reset(seed) for seeds SEED .. SEED+N-1, so the initial states are
# paired), printing both success rates.
#
#   bash bench/lerobot_pusht_eval.sh CHECKPOINT OUT [N=50] [SEED=100000] [OBS_TYPE=state|image]
#   SAMPLER=ddim STEPS=10 bash bench/lerobot_pusht_eval.sh ...   # the same sampler override on both sides
#
# Runs in the LeRobot environment of scripts/lerobot-plugin-env.sh (VENV, default /work/lerobot-venv), so
# both evaluations use the same torch. The checkpoint's config.yaml and model.safetensors are copied to
# OUT/checkpoint and exported there: the original folder is only read.
set -euo pipefail

CKPT="$1"
OUT="$2"
N="${3:-50}"
SEED="${4:-100000}"
OBS="${5:-state}"
VENV="${VENV:-/work/lerobot-venv}"
RUN=(nice -n 19 env OMP_NUM_THREADS=1 MUJOCO_GL=egl)

mkdir -p "$OUT/checkpoint"
cp "$CKPT/config.yaml" "$CKPT/model.safetensors" "$OUT/checkpoint/"
"$VENV/bin/diffpolicy-lerobot-export" "$OUT/checkpoint" --device cpu

OURS_EXTRA=()
LEROBOT_EXTRA=()
if [ -n "${SAMPLER:-}" ]; then
  OURS_EXTRA=(eval.sampler="$SAMPLER" eval.num_inference_steps="${STEPS:?STEPS must go with SAMPLER}")
  LEROBOT_EXTRA=(--policy.sampler="$SAMPLER" --policy.num_inference_steps="$STEPS")
fi
if [ "$OBS" = state ]; then LR_OBS=environment_state_agent_pos; else LR_OBS=pixels_agent_pos; fi

start=$(date +%s)
"${RUN[@]}" "$VENV/bin/diffpolicy" eval --checkpoint "$OUT/checkpoint" --episodes "$N" --out "$OUT/diffpolicy" \
  eval.seed="$SEED" eval.n_envs="$N" eval.n_videos=0 "${OURS_EXTRA[@]}"
mid=$(date +%s)
"${RUN[@]}" "$VENV/bin/lerobot-eval" --policy.path="$OUT/checkpoint" --env.type=pusht --env.obs_type="$LR_OBS" --eval.use_async_envs=false \
  --eval.n_episodes="$N" --eval.batch_size="$N" --seed="$SEED" --policy.device=cpu --output_dir="$OUT/lerobot" \
  "${LEROBOT_EXTRA[@]}"
end=$(date +%s)

"$VENV/bin/python" - "$OUT" "$((mid - start))" "$((end - mid))" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
ours = json.loads((out / "diffpolicy" / "report.json").read_text())
theirs = json.loads((out / "lerobot" / "eval_info.json").read_text())
ep = theirs["per_task"][0]["metrics"]["successes"]
print(f"diffpolicy eval: success {ours['success_rate']:.3f} over {ours['n_episodes']} episodes ({sys.argv[2]} s)")
print(f"lerobot-eval:    success {sum(ep) / len(ep):.3f} over {len(ep)} episodes ({sys.argv[3]} s)")
# LeRobot lists episodes in seed order (seed, seed + 1, ...), as our report does
mine = [bool(e["success"]) for e in sorted(ours["episodes"], key=lambda e: e["seed"])]
pairs = list(zip(mine, ep, strict=True))
print("paired: both %d, only diffpolicy %d, only lerobot %d, neither %d" % tuple(
    sum(1 for a, b in pairs if (a, bool(b)) == k) for k in ((1, 1), (1, 0), (0, 1), (0, 0))))
EOF
