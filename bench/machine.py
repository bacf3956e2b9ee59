"""The machine line every benchmark table states."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe_machine() -> str:
    """Host, CPU model, cores, torch version and threads, Python, current load."""
    import torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}, "
            f"load average at start {os.getloadavg()[0]:.1f}")
