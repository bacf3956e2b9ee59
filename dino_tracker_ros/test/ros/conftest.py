"""Fixtures of the ROS tests: a client node spinning in this process, node processes.

Real DDS on loopback: the root conftest gives the run its own ``ROS_DOMAIN_ID`` and
``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``. The nodes under test run where a user has
them, in subprocesses (``python -m dino_tracker_ros.ros.composed`` etc.); the test side is
an rclpy node in its own context, spun by a multi-threaded executor on a thread.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("dino_tracker_msgs.msg")

from rclpy.action import ActionClient  # noqa: E402
from rclpy.context import Context  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.qos import QoSProfile  # noqa: E402
from rclpy.signals import SignalHandlerOptions  # noqa: E402

from dino_tracker_ros.ros.runtime import spin_until  # noqa: E402

PACKAGE_DIR = Path(__file__).resolve().parents[2]  # dino_tracker_ros/ (the ament package)
CONFIG_FILE = PACKAGE_DIR / "config" / "dino_tracker.yaml"


_RUNNING: list[NodeProcess] = []  # node processes of the current module, for failure reports


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report ends with the last lines of each running node process's log."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for proc in _RUNNING:
            tail = "\n".join(proc.output().splitlines()[-40:])
            report.sections.append((f"node log {proc.log_path} (last 40 lines)", tail))


class NodeProcess:
    """A node process started like a user would; output to a log file; stopped by SIGINT."""

    def __init__(self, args: list[str], log_path: Path, cwd: Path) -> None:
        self.log_path = log_path
        path = os.pathsep.join(p for p in (str(PACKAGE_DIR), os.environ.get("PYTHONPATH"))
                               if p)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}  # this source tree
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env,
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 60.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.output().count(text) >= count:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"node process exited ({self.proc.returncode}) before "
                                     f"{text!r}:\n{self.output()[-5000:]}")
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not printed within {timeout} s:\n{self.output()[-5000:]}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class RosClient:
    """The test's own node, spun on a background thread, with blocking helpers."""

    def __init__(self, context: Context, name: str, namespace: str) -> None:
        self.node = rclpy.create_node(name, namespace=namespace, context=context)
        self.executor = MultiThreadedExecutor(num_threads=4, context=context)
        self.executor.add_node(self.node)
        self.errors: list[str] = []  # tracebacks of callbacks that raised on this side
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=spin_until, args=(self.executor, self._stop, self.errors.append), daemon=True)
        self._thread.start()

    def wait_future(self, future, timeout: float):
        deadline = time.monotonic() + timeout
        while not future.done():
            if time.monotonic() > deadline:
                raised = f"; client callbacks raised:\n{self.errors[-1]}" if self.errors else ""
                raise AssertionError(f"no answer within {timeout} s{raised}")
            time.sleep(0.005)
        return future.result()

    def client(self, srv_type, name: str, timeout: float = 30.0):
        cli = self.node.create_client(srv_type, name)
        assert cli.wait_for_service(timeout_sec=timeout), f"service {name} not available"
        return cli

    def call(self, cli, request, timeout: float = 60.0):
        return self.wait_future(cli.call_async(request), timeout)

    def action_client(self, action_type, name: str, timeout: float = 30.0) -> ActionClient:
        cli = ActionClient(self.node, action_type, name)
        assert cli.wait_for_server(timeout_sec=timeout), f"action {name} not available"
        return cli

    def collect(self, msg_type, topic: str, qos: QoSProfile | int = 10) -> list:
        """Messages arriving on ``topic`` from now on, as (receive time, message)."""
        box: list = []
        self.node.create_subscription(msg_type, topic,
                                      lambda m: box.append((time.monotonic(), m)), qos)
        return box

    def close(self) -> None:
        self._stop.set()
        self.executor.shutdown()
        self._thread.join(10)
        self.node.destroy_node()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def ros_context() -> Iterator[Context]:
    """An rclpy context of this test module (no signal handlers in the pytest process)."""
    ctx = Context()
    rclpy.init(context=ctx, signal_handler_options=SignalHandlerOptions.NO)
    yield ctx
    ctx.try_shutdown()


@pytest.fixture(scope="module")
def node_process(tmp_path_factory) -> Iterator[Callable[..., NodeProcess]]:
    """Factory ``node_process(module, *args)`` -> a running Python process (module scope).

    ``module`` is run with ``python -m``; pass ``"-c"`` and the code instead to run code.
    """
    procs: list[NodeProcess] = []
    base = tmp_path_factory.mktemp("nodes")

    def start(module: str, *args: str) -> NodeProcess:
        argv = [module, *args] if module.startswith("-") else ["-m", module, *args]
        proc = NodeProcess(argv, base / f"{len(procs)}.log", base)
        procs.append(proc)
        _RUNNING.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()
        _RUNNING.remove(proc)


@pytest.fixture(scope="session")
def wait() -> Callable[[Callable[[], bool], float, str], None]:
    """``wait(predicate, timeout, what)``: poll until true or fail."""
    return wait_until


@pytest.fixture(scope="module")
def make_client(ros_context) -> Iterator[Callable[[str, str], RosClient]]:
    """Factory ``make_client(name, namespace)`` -> RosClient (closed at module end)."""
    clients: list[RosClient] = []

    def make(name: str, namespace: str) -> RosClient:
        clients.append(RosClient(ros_context, name, namespace))
        return clients[-1]

    yield make
    for c in clients:
        c.close()


@pytest.fixture(scope="session")
def config_file() -> Path:
    """The package's params file."""
    return CONFIG_FILE
