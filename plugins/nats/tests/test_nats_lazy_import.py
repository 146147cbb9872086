"""Every Streaming() loads every installed plugin: loading this one must not import nats-py or the backend."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)


def test_loading_the_plugin_imports_no_nats_until_a_service_uses_it() -> None:
    code = ("import sys, json\n"
            "from forge_streaming import Streaming\n"
            "Streaming({'plugins': {'allow': ['nats', 'memory-pubsub', 'memory-rooms']}})\n"
            "before = 'nats' in sys.modules\n"
            "import forge_streaming_nats\n"
            "forge_streaming_nats.NatsPubSub\n"
            "print(json.dumps([before, 'nats' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [False, True]
