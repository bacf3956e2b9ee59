"""Make the CMake files of the ROS 2 PyPI wheels usable in this virtual environment.

The wheels' ``share/*/cmake/*__rosidl_generator_pyExport.cmake`` files name the include
directories of the machine the wheels were built on (``/opt/python/cp3XX-cp3XX/...``). CMake
refuses imported targets whose include directories do not exist, so building an interface
package against the wheels fails until those entries point at this interpreter's Python
headers and numpy headers. This script rewrites them in place (idempotent).

Usage: ``python tools/fix_ros_wheels.py [PREFIX]`` (default: ``sys.prefix``).
"""

from __future__ import annotations

import re
import sys
import sysconfig
from pathlib import Path

_PROPERTY = re.compile(r'(INTERFACE_INCLUDE_DIRECTORIES\s+")([^"]*)(")')


def _replacement(entry: str, python_include: str, numpy_include: str) -> str:
    """Return the local directory that stands for a missing include directory ``entry``."""
    if Path(entry).is_dir() or "${" in entry:
        return entry
    if "numpy" in entry:
        return numpy_include
    if re.search(r"include/python3\.\d+$", entry):
        return python_include
    return entry


def fix_prefix(prefix: Path) -> int:
    """Rewrite the pyExport CMake files under ``prefix/share``; return how many changed."""
    import numpy

    python_include = sysconfig.get_paths()["include"]
    numpy_include = numpy.get_include()
    changed = 0
    for path in sorted(prefix.glob("share/*/cmake/*__rosidl_generator_pyExport.cmake")):
        text = path.read_text()

        def _fix(match: re.Match[str]) -> str:
            entries = [
                _replacement(e, python_include, numpy_include)
                for e in match.group(2).split(";")
                if e
            ]
            return match.group(1) + ";".join(dict.fromkeys(entries)) + match.group(3)

        new_text = _PROPERTY.sub(_fix, text)
        if new_text != text:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(new_text)
            tmp.replace(path)
            changed += 1
    return changed


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = sys.argv[1:] if argv is None else argv
    prefix = Path(args[0]) if args else Path(sys.prefix)
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        sys.stderr.write(
            "setup: missing prerequisite: Python development headers (Python.h; "
            "Debian/Ubuntu: apt-get install python3-dev)\n"
        )
        return 1
    fix_prefix(prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
