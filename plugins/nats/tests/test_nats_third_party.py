"""The private parts of nats-py that dispatch.py uses, named so that an upgrade that changes them fails here
first (pyproject.toml pins nats-py to the minor version checked, 2.16)."""

from __future__ import annotations

import inspect
from importlib.metadata import version

from nats.aio.client import Client
from nats.aio.subscription import Subscription


def test_the_nats_py_version_is_the_one_checked() -> None:
    assert version("nats-py").startswith("2.16."), "dispatch.py was checked against nats-py 2.16: check it again"


def test_a_subscription_keeps_its_pending_queue_and_size_where_dispatch_py_replaces_them() -> None:
    source = inspect.getsource(Subscription.__init__)
    assert "self._pending_queue" in source and "self._pending_size" in source
    read_loop = inspect.getsource(Client._process_msg)
    assert "sub._pending_queue.put_nowait(msg)" in read_loop, "nats-py no longer puts messages in the queue"
    assert "sub._pending_bytes_limit > 0" in read_loop, "pending_bytes_limit=0 no longer turns the check off"
