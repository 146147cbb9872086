"""Device publishes: what a bare MQTT payload on ``{prefix}/rooms/{room}/publish`` means.

One node of the cluster (an MQTT v5 shared subscription picks it) turns
each device publish into a regular room message through the backend
listener's ``ingest`` (the service): hooks run, a sequence is issued,
history keeps it, and every node delivers the same bytes.

A device speaks as ``device:<the user_id it claims>`` (``device:mqtt`` when
it claims none): whatever it claims, it cannot pass for a member, whose
user ids come from authentication.
"""

from __future__ import annotations

import json
from typing import Any

from .topics import valid_id

DEVICE_PREFIX = "device:"
DEFAULT_DEVICE_USER = "mqtt"
MAX_DEVICE_USER_LENGTH = 128


class DevicePayloadError(ValueError):
    pass


def device_user(claimed: str) -> str:
    """The user id of a device that calls itself ``claimed`` (already namespaced ids are kept as they are)."""
    return claimed if claimed.startswith(DEVICE_PREFIX) else DEVICE_PREFIX + claimed


def parse_device_payload(payload: bytes, *, max_size: int) -> tuple[Any, str]:
    """``(data, user_id)`` of a device payload; ``user_id`` is always in the ``device:`` namespace.

    A JSON object with a ``data`` key gives ``data`` (and the claimed
    ``user_id`` when it is a string: printable, 1 to 128 characters, else
    the payload is refused); any other JSON value is the data itself; text
    that is not JSON is sent as a string.
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
        return text, device_user(DEFAULT_DEVICE_USER)
    if isinstance(value, dict) and "data" in value:
        user = value.get("user_id")
        if not isinstance(user, str) or not user:
            return value["data"], device_user(DEFAULT_DEVICE_USER)
        if not valid_id(user, MAX_DEVICE_USER_LENGTH - len(DEVICE_PREFIX)):
            raise DevicePayloadError(f"user_id {user[:40]!r} is not printable text of at most "
                                     f"{MAX_DEVICE_USER_LENGTH - len(DEVICE_PREFIX)} characters")
        return value["data"], device_user(user)
    return value, device_user(DEFAULT_DEVICE_USER)
