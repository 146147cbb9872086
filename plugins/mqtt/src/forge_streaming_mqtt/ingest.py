"""Device publishes: what a bare MQTT payload on ``{prefix}/rooms/{room}/publish`` means.

One node of the cluster (an MQTT v5 shared subscription picks it) turns
each device publish into a regular room message through the backend
listener's ``ingest`` (the service): hooks run, a sequence is issued,
history keeps it, and every node delivers the same bytes.
"""

from __future__ import annotations

import json
from typing import Any

DEFAULT_DEVICE_USER = "mqtt"


class DevicePayloadError(ValueError):
    pass


def parse_device_payload(payload: bytes, *, max_size: int) -> tuple[Any, str]:
    """``(data, user_id)`` of a device payload.

    A JSON object with a ``data`` key gives ``data`` (and ``user_id`` when
    it is a string); any other JSON value is the data itself; text that is
    not JSON is sent as a string.
    """
    if len(payload) > max_size:
        raise DevicePayloadError(f"payload of {len(payload)} bytes, the limit (limits.max_message_size) is {max_size}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise DevicePayloadError("payload is not UTF-8 text") from None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return text, DEFAULT_DEVICE_USER
    if isinstance(value, dict) and "data" in value:
        user = value.get("user_id")
        return value["data"], user if isinstance(user, str) and user else DEFAULT_DEVICE_USER
    return value, DEFAULT_DEVICE_USER
