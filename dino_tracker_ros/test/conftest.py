"""Test-run environment shared by the whole suite.

At import time (before any test imports rclpy) this sets, for this process and every child:

* ``ROS_DOMAIN_ID``: one per test run (1..100, from the pid; ``DINO_TRACKER_TEST_DOMAIN_ID``
  overrides), so parallel runs on one host do not see each other's nodes;
* ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``: DDS traffic stays on this host;
* ``ROS_LOG_DIR``: a temporary directory, removed at the end of the run.

Fixture ``spawn_python`` starts Python subprocesses with that environment (a code string, a
module name or a script path) and stops them at teardown::

    def test_x(spawn_python):
        peer = spawn_python("dino_tracker_ros.ros.recorder", "--ros-args", "-p", "a:=1")
        peer.wait_for("ready", timeout=20)   # text in its stdout/stderr
        ...

Tests run with ``--import-mode=importlib`` (see setup.cfg): share fixtures here, plain helper
functions in ``suite_helpers.py`` (this directory is put on ``sys.path``), and never import
test modules.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

__all__ = ["PythonProcess", "spawn_python"]

sys.path.insert(0, str(Path(__file__).resolve().parent))  # suite_helpers

_DOMAIN_ID = int(os.environ.get("DINO_TRACKER_TEST_DOMAIN_ID", 1 + os.getpid() % 100))
_ROS_LOG_DIR = tempfile.mkdtemp(prefix="dino_tracker_test_roslog_")
os.environ["ROS_DOMAIN_ID"] = str(_DOMAIN_ID)
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_LOG_DIR"] = _ROS_LOG_DIR

_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the run's ROS log directory."""
    shutil.rmtree(_ROS_LOG_DIR, ignore_errors=True)


class PythonProcess(subprocess.Popen):
    """A Python child whose stdout and stderr go to ``log_path`` (one file, unbuffered)."""

    log_path: Path

    def output(self) -> str:
        """Everything the child has written so far."""
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 20.0) -> None:
        """Wait until ``text`` appears in the child's output.

        Raises:
            AssertionError: the child exited first or ``timeout`` seconds passed; the
                message holds its output.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.poll() is not None:
                raise AssertionError(
                    f"child exited with {self.returncode} before printing {text!r}:\n"
                    + self.output()
                )
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not printed within {timeout} s:\n" + self.output())

    def stop(self, timeout: float = 5.0) -> int:
        """SIGINT (rclpy shuts down cleanly), then SIGKILL after ``timeout`` s; the exit code."""
        if self.poll() is None:
            self.send_signal(signal.SIGINT)
            try:
                self.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                self.wait()
        return self.returncode


@pytest.fixture
def spawn_python(tmp_path: Path) -> Iterator[Callable[..., PythonProcess]]:
    """Factory ``spawn_python(code_or_module_or_script, *args, env=None)`` -> PythonProcess.

    The first argument is run as ``python -m NAME`` when it is a dotted module name, as
    ``python PATH`` when it names an existing ``.py`` file, else as ``python -c CODE``.
    ``env`` adds or overrides variables of the test environment. The child runs in
    ``tmp_path`` and is stopped at teardown.
    """
    children: list[PythonProcess] = []

    def spawn(target: str, *args: str, env: dict[str, str] | None = None) -> PythonProcess:
        if target.endswith(".py") and Path(target).is_file():
            cmd = [sys.executable, target]
        elif _MODULE_NAME.match(target):
            cmd = [sys.executable, "-m", target]
        else:
            cmd = [sys.executable, "-c", target]
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        log_path = tmp_path / f"child_{len(children)}.log"
        with open(log_path, "wb") as log:
            proc = PythonProcess(
                [*cmd, *args],
                cwd=tmp_path,
                env=child_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        proc.log_path = log_path
        children.append(proc)
        return proc

    yield spawn
    for child in children:
        child.stop()
