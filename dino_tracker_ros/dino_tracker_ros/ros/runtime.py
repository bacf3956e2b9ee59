"""What the nodes share: names, QoS profiles, and the process runner behind every ``main()``.

:func:`run_nodes` is the one place that initialises rclpy, spins the nodes on a
:class:`~rclpy.executors.MultiThreadedExecutor` in the main thread, and shuts down in the
order that keeps rclpy from aborting at exit: stop the nodes' own worker threads (so no
executor callback stays blocked), ``executor.shutdown()``, ``destroy_node()``, then
``rclpy.try_shutdown()``. Ctrl-C (SIGINT) and SIGTERM end it cleanly with exit code 0; a
bad startup parameter ends it with a one-line error and exit code 2.

A callback that raises (a bug, or input nobody foresaw) does not end the process: the
executor re-raises it from ``spin_once``, :func:`run_nodes` logs it with its traceback and
keeps spinning, so the other callbacks, services and nodes stay up.

The signals are handled here rather than by rclpy (which would invalidate the context at
once): the nodes are stopped while the context still works, so a running training job is
cancelled at its next iteration (its checkpoint kept) and its action client still gets a
final (aborted) result before the process exits.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence

import rclpy
import rclpy.logging
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions

from ..core.errors import DinoTrackerError

__all__ = [
    "CLIPS_QOS", "DEFAULT_NAMESPACE", "SERVICE_QOS", "StoppableNode", "camera_qos", "run_nodes",
]

_SPIN_PERIOD_S = 0.1  # longest delay between a signal and the start of the shutdown
_FLUSH_S = 0.5  # spinning after the nodes stopped, to send their last messages

#: Namespace of the nodes unless remapped (``--ros-args -r __ns:=/other``).
DEFAULT_NAMESPACE = "/dino_tracker"

#: ``clips``: reliable and transient-local, so a late trainer or tracker still learns of
#: the last 100 clip announcements and state updates.
CLIPS_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=100,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)


#: Services and action services: reliable with a deep request queue. ROS's default keeps
#: the last 10 requests, so when more callers wait than that (one callback group answers
#: one request at a time) DDS silently drops the oldest requests and their callers never
#: get an answer (measured: 50 concurrent query_tracks calls).
SERVICE_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1000,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.VOLATILE,
)


def camera_qos(reliability: str, depth: int) -> QoSProfile:
    """QoS of a camera subscription: keep last ``depth``, ``reliable`` or best effort."""
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST, depth=int(depth),
        reliability=(ReliabilityPolicy.RELIABLE if reliability == "reliable"
                     else ReliabilityPolicy.BEST_EFFORT),
        durability=DurabilityPolicy.VOLATILE,
    )


class StoppableNode(Node):
    """A node with worker threads: :meth:`stop` ends them before the executor shuts down."""

    def stop(self) -> None:
        """Stop background work and release blocked callbacks (idempotent)."""

    def destroy_node(self) -> None:
        """Stop background work, then destroy the node."""
        self.stop()
        super().destroy_node()


def run_nodes(
    factories: Sequence[Callable[[], Node]],
    args: list[str] | None = None,
    num_threads: int | None = None,
) -> int:
    """Create nodes, spin them until shutdown, and tear everything down in order.

    Args:
        factories: callables creating the nodes (called after ``rclpy.init``).
        args: command line (default ``sys.argv``), ROS arguments after ``--ros-args``.
        num_threads: executor threads (default: 2 per node, at least 4).

    Returns:
        Process exit code: 0 on a normal shutdown, 2 on a configuration error.
    """
    rclpy.init(args=sys.argv if args is None else args,
               signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    nodes: list[Node] = []
    executor = MultiThreadedExecutor(num_threads=num_threads or max(4, 2 * len(factories)))
    code = 0
    try:
        for make in factories:
            nodes.append(make())
            executor.add_node(nodes[-1])
        while not stop.is_set() and rclpy.ok():
            try:
                executor.spin_once(timeout_sec=_SPIN_PERIOD_S)
            except (KeyboardInterrupt, ExternalShutdownException):
                raise
            except Exception:  # a callback raised: log it, keep the nodes serving
                rclpy.logging.get_logger("dino_tracker").error(
                    f"a callback raised; the node keeps running:\n{traceback.format_exc()}",
                    throttle_duration_sec=1.0)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (DinoTrackerError, InvalidParameterValueException,
            InvalidParameterTypeException) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        rclpy.logging.get_logger("dino_tracker").error(first)
        code = 2
    finally:
        for node in nodes:
            if isinstance(node, StoppableNode):
                node.stop()
        # deliver what stopping produced (final action results, state announcements)
        deadline = time.monotonic() + _FLUSH_S
        while rclpy.ok() and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
        for node in nodes:
            executor.remove_node(node)
        # Let dispatched callbacks finish first: Executor.shutdown() destroys the guard
        # condition they trigger on completion before it waits for them.
        pending = list(getattr(executor, "_futures", []))
        deadline = time.monotonic() + 5.0
        while any(not task.done() for task in pending) and time.monotonic() < deadline:
            time.sleep(0.01)
        executor.shutdown()
        for node in nodes:
            node.destroy_node()
        rclpy.try_shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code
