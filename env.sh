# Source this file (`. ./env.sh`, bash or zsh) to put the project's environment into the
# current shell: the virtual environment, the colcon workspace (install/setup.bash or .zsh),
# the `dino-tracker` command, and local-only DDS discovery unless you chose otherwise.
# `make setup` must have run once. Afterwards
#   python -c "import rclpy, dino_tracker_msgs.msg, dino_tracker_ros"
# works, and so do `dino-tracker --help` and `python -m dino_tracker_ros.ros.composed`.

if [ -n "${BASH_VERSION:-}" ]; then
    _dt_root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    _dt_shell=bash
elif [ -n "${ZSH_VERSION:-}" ]; then
    # shellcheck disable=SC2296  # zsh parameter expansion
    _dt_root="$(cd "$(dirname "${(%):-%x}")" && pwd)"
    _dt_shell=zsh
else
    _dt_root="$(pwd)"
    _dt_shell=sh
fi
_dt_venv="${VENV:-$_dt_root/.venv}"

if [ ! -f "$_dt_venv/bin/activate" ] || [ ! -f "$_dt_root/install/local_setup.sh" ]; then
    echo "env.sh: no environment yet in $_dt_root; run 'make setup' there first" >&2
    unset _dt_root _dt_shell _dt_venv
    return 1 2>/dev/null || exit 1
fi

# shellcheck disable=SC1091
. "$_dt_venv/bin/activate"

# The workspace. With a sourced ROS 2 distro, setup.* re-sources it (the prefix chain colcon
# recorded at build time); with the PyPI wheels the chain is empty.
if [ -f "$_dt_root/install/setup.$_dt_shell" ]; then
    # shellcheck disable=SC1090
    . "$_dt_root/install/setup.$_dt_shell"
else
    # shellcheck disable=SC1091
    . "$_dt_root/install/local_setup.sh"
fi

# colcon leaves an empty entry (= the current directory) when the variable was unset
LD_LIBRARY_PATH="${LD_LIBRARY_PATH%:}"
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH#:}"

if [ -z "${ROS_DISTRO:-}" ]; then
    # ROS 2 from the PyPI wheels: the venv prefix is the "underlay" (ament index, share/).
    case ":${AMENT_PREFIX_PATH:-}:" in
        *":$_dt_venv:"*) ;;
        *) export AMENT_PREFIX_PATH="${AMENT_PREFIX_PATH:+$AMENT_PREFIX_PATH:}$_dt_venv" ;;
    esac
fi

# Discovery stays on this host unless the user set a range (ROS_LOCALHOST_ONLY is ignored
# by Kilted).
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
# OpenMP threads wait passively (spinning threads are pathological on a shared CPU; see
# dino_tracker_ros/__init__.py for the measurement).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

# `dino-tracker` (tools/setup.sh links it into the venv's bin, which is on PATH now).
hash -r 2>/dev/null || true
unset _dt_root _dt_shell _dt_venv
