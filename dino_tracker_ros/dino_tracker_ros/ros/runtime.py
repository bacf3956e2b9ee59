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
import warnings
from collections.abc import Callable, Sequence

import rclpy
import rclpy.logging
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.executors import (
    Executor,
    ExternalShutdownException,
    MultiThreadedExecutor,
    ShutdownException,
)
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.service import Service
from rclpy.signals import SignalHandlerOptions

from ..core.errors import DinoTrackerError

__all__ = [
    "CLIPS_QOS", "DEFAULT_NAMESPACE", "SERVICE_QOS", "StoppableNode", "camera_qos",
    "create_service", "run_nodes", "send_patiently", "spin_until",
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


#: How long a service keeps re-sending an answer its client's response reader has not
#: matched yet (see :func:`create_service`).
RESPONSE_PATIENCE_S = 10.0
_RESPONSE_LOST = "failed to send response"
_WARNINGS_LOCK = threading.Lock()


def _delivered(send: Callable[[], None]) -> bool:
    """Call ``send`` once; False if rclpy warned that the answer was not delivered."""
    # catch_warnings swaps process-wide state: one sender at a time, for one send
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        send()
    lost = False
    for w in caught:
        if str(w.message).startswith(_RESPONSE_LOST):
            lost = True
        else:  # another thread's warning of that moment goes out as usual
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return not lost


def send_patiently(send: Callable[[], None], patience_s: float = RESPONSE_PATIENCE_S,
                   pause_s: float = 0.05) -> int:
    """Call ``send`` until it stops reporting the answer as undeliverable.

    Fast DDS sends an answer only once the server has matched the client's response reader
    and gives up after 100 ms (rclpy warns ``failed to send response (timeout)``): the
    answer is dropped and the caller waits forever. On a loaded machine a client's first
    call after ``wait_for_service`` can arrive that early (ros2/rmw_fastrtps#467; Nav2 users
    meet it at startup).

    Returns:
        The number of attempts (1: delivered at once).

    Raises:
        TimeoutError: still undeliverable after ``patience_s`` seconds.
    """
    deadline = time.monotonic() + patience_s
    attempts = 1
    while not _delivered(send):
        if time.monotonic() + pause_s > deadline:
            raise TimeoutError(f"not delivered in {attempts} attempts over {patience_s:g} s")
        time.sleep(pause_s)
        attempts += 1
    return attempts


def create_service(node: Node, srv_type, name: str, callback: Callable, *,
                   callback_group=None) -> Service:
    """``node.create_service`` with :data:`SERVICE_QOS` and answers that wait for slow clients.

    An answer Fast DDS drops because the client's response reader is not matched yet (see
    :func:`send_patiently`) is sent again from a background thread for up to
    :data:`RESPONSE_PATIENCE_S`, so the service's callback group is free for the next
    request meanwhile; an answer that never goes out is logged.
    """
    srv = node.create_service(srv_type, name, callback, qos_profile=SERVICE_QOS,
                              callback_group=callback_group)
    send = srv.send_response
    log = node.get_logger()

    def resend(response, header) -> None:
        try:
            attempts = send_patiently(lambda: send(response, header))
        except TimeoutError as exc:
            log.error(f"{srv.service_name}: an answer could not be delivered, the client's "
                      f"response reader never matched (incompatible QoS, or it left): {exc}")
        except Exception as exc:  # the node was destroyed meanwhile
            log.debug(f"{srv.service_name}: answer dropped: {exc!r}")
        else:
            log.info(f"{srv.service_name}: answer delivered at attempt {attempts + 1} (the "
                     "client's response reader matched late)")

    def send_response(response, header) -> None:
        if not _delivered(lambda: send(response, header)):
            threading.Thread(target=resend, args=(response, header), daemon=True,
                             name=f"resend {srv.service_name}").start()

    srv.send_response = send_response  # the executor sends every answer through this
    return srv


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


def spin_until(executor: Executor, stop: threading.Event,
               on_error: Callable[[str], None]) -> None:
    """Spin ``executor`` until ``stop`` is set or it or its context shuts down.

    A callback that raises (or an rclpy race, e.g. entities created from another thread
    while it waits, ros2/rclpy#564) does not end the spinning: its traceback goes to
    ``on_error`` and the other callbacks keep being served.
    """
    while not stop.is_set() and executor.context.ok():
        try:
            executor.spin_once(timeout_sec=_SPIN_PERIOD_S)
        except (ExternalShutdownException, ShutdownException):
            return
        except Exception:
            on_error(traceback.format_exc())


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
        log = rclpy.logging.get_logger("dino_tracker")
        spin_until(executor, stop, lambda tb: log.error(
            f"a callback raised; the node keeps running:\n{tb}", throttle_duration_sec=1.0))
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
