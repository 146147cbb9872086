"""Startup (issue 19): what a server may not use is not imported with the kernel or the plugins.

aioquic and cryptography (about 0.1 s) are imported when the WebTransport
transport starts, in a worker thread (test_webtransport_startup.py), yaml when
a config file or an override is read, sse-starlette when a handler sends an
Event. Each check runs in a fresh interpreter, so
nothing imported by the test session counts. That the server still starts
(and imports them then) is what the other WebTransport tests check.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

HEAVY = ("aioquic", "cryptography", "yaml", "sse_starlette")


def _imported_after(statement: str) -> list[str]:
    code = f"import sys\n{statement}\nimport json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    modules = json.loads(out.stdout.strip().splitlines()[-1])
    return [name for name in HEAVY if name in modules]


def test_importing_the_kernel_imports_no_quic_tls_or_yaml() -> None:
    assert _imported_after("import forge_streaming") == []


def test_importing_the_plugins_imports_neither_aioquic_nor_cryptography() -> None:
    statement = ("import forge_streaming_webtransport, forge_streaming_webtransport.plugin\n"
                 "import forge_streaming_sse, forge_streaming_sse.plugin")
    assert _imported_after(statement) == []


def test_loading_the_plugin_leaves_sessions_and_streams_to_the_quic_server() -> None:
    """They are imported with the QUIC server, off the event loop; the names still import from the package."""
    code = ("import sys, forge_streaming_webtransport.plugin\n"
            "print(sorted(m for m in sys.modules if m.startswith('forge_streaming_webtransport.')))\n"
            "from forge_streaming_webtransport import StreamClosed, WebTransportSession, encode_message\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    loaded = out.stdout.strip()
    for module in ("session", "streams", "framing", "events", "server", "aioquic_adapter"):
        assert f"forge_streaming_webtransport.{module}'" not in loaded


def test_a_service_without_a_config_file_reads_no_yaml() -> None:
    allow = ["websocket", "sse", "webtransport", "memory-pubsub", "memory-rooms"]
    statement = f"import forge_streaming\nforge_streaming.Streaming({{'plugins': {{'allow': {allow!r}}}}})"
    assert "yaml" not in _imported_after(statement)

