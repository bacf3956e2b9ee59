"""The nodes' runtime helpers: answers re-sent to late-matching clients, resilient spinning.

The rclpy behaviour these rely on (an undeliverable answer is a ``RuntimeWarning``
starting ``failed to send response``) is checked over real DDS in
``test_reliability_services.py::test_undeliverable_answer_is_logged_and_others_served``.
"""

from __future__ import annotations

import threading
import time
import warnings

import pytest
import rclpy
from rclpy.executors import SingleThreadedExecutor
from std_msgs.msg import Int32

from dino_tracker_ros.ros.runtime import send_patiently, spin_until

LOST = "failed to send response (timeout): client will not receive response, at rmw_response.cpp"


class Sender:
    """Reports the answer as lost (the way rclpy does) ``lost`` times, then delivers it."""

    def __init__(self, lost: int, other: str | None = None) -> None:
        self.lost, self.other, self.calls = lost, other, 0

    def __call__(self) -> None:
        self.calls += 1
        if self.other:
            warnings.warn(self.other, UserWarning, stacklevel=1)
        if self.calls <= self.lost:
            warnings.warn(LOST, RuntimeWarning, stacklevel=1)


def test_send_patiently_resends_until_delivered():
    send = Sender(lost=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may leak out as a warning
        assert send_patiently(send, patience_s=5.0, pause_s=0.01) == 4
    assert send.calls == 4
    assert send_patiently(Sender(lost=0)) == 1


def test_send_patiently_gives_up_after_its_patience():
    send = Sender(lost=10**6)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="not delivered"):
        send_patiently(send, patience_s=0.3, pause_s=0.02)
    assert 0.25 <= time.monotonic() - t0 < 5.0
    assert 5 <= send.calls <= 16


def test_send_patiently_passes_other_warnings_on():
    with pytest.warns(UserWarning, match="unrelated"):
        assert send_patiently(Sender(lost=1, other="unrelated"), pause_s=0.01) == 2


def test_spin_until_survives_a_raising_callback(ros_context):
    node = rclpy.create_node("spin_probe", context=ros_context)
    got: list[int] = []

    def on_msg(msg: Int32) -> None:
        if msg.data == 0:
            raise ValueError("first message")
        got.append(msg.data)

    node.create_subscription(Int32, "spin_probe", on_msg, 10)
    pub = node.create_publisher(Int32, "spin_probe", 10)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    stop, errors = threading.Event(), []
    thread = threading.Thread(target=spin_until, args=(executor, stop, errors.append))
    thread.start()
    try:
        for k in range(3):
            pub.publish(Int32(data=k))
            time.sleep(0.2)
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join(10)
        executor.shutdown()
        node.destroy_node()
    assert not thread.is_alive()
    assert got == [1, 2]
    assert len(errors) == 1 and "ValueError: first message" in errors[0]
