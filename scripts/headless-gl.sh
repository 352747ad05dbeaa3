#!/usr/bin/env bash
# Headless OpenGL for the MuJoCo tasks: they render through EGL (MUJOCO_GL=egl, set by the tasks), which
# needs Mesa's libEGL and its software/GPU drivers. Installs them with apt where they are missing; does
# nothing where they are present. Needs root (or sudo) on Debian/Ubuntu; elsewhere install the
# equivalent of libegl1 + libgl1-mesa-dri by hand.
set -euo pipefail
if ldconfig -p 2>/dev/null | grep -q 'libEGL.so.1' && ldconfig -p | grep -q 'libEGL_mesa.so.0'; then
  exit 0
fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -q && $SUDO apt-get install -y -q libegl1 libegl-mesa0 libgl1-mesa-dri
