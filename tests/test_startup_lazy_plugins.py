"""Startup (issue 19): loading the installed plugins imports none of their client libraries.

Every ``Streaming()`` loads every installed plugin, configured or not, so a
plugin that imports its library at load makes every service pay for it:
PyJWT and cryptography (jwt, about 25 ms), aiomqtt and paho-mqtt (mqtt,
about 30 ms), prometheus-client (prometheus, about 9 ms), nats-py (nats).
They are imported when a service's config uses them; the plugins' own tests
check that they then work as before. Each check runs in a fresh interpreter,
so nothing imported by the test session counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

pytestmark = pytest.mark.timeout(120)

HEAVY = ("aiomqtt", "paho", "jwt", "cryptography", "prometheus_client", "nats")
"""Top-level modules of the plugins' libraries."""

PLUGINS = {"jwt", "mqtt", "prometheus", "nats"}
"""The plugins whose libraries these are."""


def _imported_after(statement: str) -> list[str]:
    code = f"import sys\n{statement}\nimport json\nprint(json.dumps(sorted(sys.modules)))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_STREAMING")}  # no allow/deny list
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         env=env)
    modules = json.loads(out.stdout.strip().splitlines()[-1])
    return sorted({name.split(".")[0] for name in modules if name.split(".")[0] in HEAVY})


def test_the_plugins_under_test_are_installed() -> None:
    installed = {ep.name for ep in entry_points(group="forge_streaming")}
    assert PLUGINS <= installed, f"not installed: {sorted(PLUGINS - installed)}"


def test_a_service_with_every_installed_plugin_and_the_default_config_imports_no_client_library() -> None:
    statement = ("import forge_streaming\n"
                 "streaming = forge_streaming.Streaming()\n"
                 f"assert {PLUGINS!r} <= set(streaming.plugins.names()), streaming.plugins.names()\n"
                 "streaming.asgi_app()")
    assert _imported_after(statement) == []


def test_importing_the_plugin_packages_imports_no_client_library() -> None:
    statement = ("import forge_streaming_jwt, forge_streaming_mqtt, forge_streaming_mqtt.plugin\n"
                 "import forge_streaming_prometheus, forge_streaming_prometheus.plugin\n"
                 "import forge_streaming_nats, forge_streaming_nats.plugin")
    assert _imported_after(statement) == []


@pytest.mark.parametrize(("statement", "library"), [
    ("from forge_streaming_mqtt import MqttPubSub", "aiomqtt"),
    ("from forge_streaming_mqtt import MqttRoomStore", "paho"),
    ("from forge_streaming_prometheus import metrics_for", "prometheus_client"),
    ("from forge_streaming_nats import NatsPubSub", "nats"),
])
def test_the_names_that_need_a_library_still_import_it(statement: str, library: str) -> None:
    assert library in _imported_after(statement)


def test_a_service_that_enables_jwt_and_prometheus_imports_their_libraries_when_built() -> None:
    config = {"jwt": {"secret": "s3cret"}, "prometheus": {"enabled": True}}
    statement = f"import forge_streaming\nforge_streaming.Streaming({config!r}).asgi_app()"
    imported = _imported_after(statement)
    assert "jwt" in imported
    assert "prometheus_client" in imported
    assert "aiomqtt" not in imported


def test_a_service_checks_its_config_without_pydantic() -> None:
    """The config sections are msgspec structs: pydantic's import and model building were ~60 ms of a start."""
    code = ("import sys, forge_streaming\n"
            "streaming = forge_streaming.Streaming({'server': {'port': 9000}, 'websocket': {'flush_window': '5ms'},\n"
            "                                       'sse': {'send_path': '/events/send'}})\n"
            "assert streaming.config.section('websocket').flush_window == 0.005\n"
            "streaming.asgi_app()\n"
            "print(sorted(name for name in sys.modules if name.split('.')[0] in ('pydantic', 'pydantic_core')))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_STREAMING")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True, env=env)
    assert out.stdout.strip().splitlines()[-1] == "[]"
