"""Config: YAML, environment overrides, durations and sizes, errors that name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import pytest
from forge_streaming import Check, ConfigError, ConfigSection, Duration, Meta, Streaming, hookimpl, load_config
from forge_streaming.config import build_config, parse_duration, parse_size


@pytest.mark.parametrize("text,seconds", [("15s", 15), ("1m", 60), ("500ms", 0.5), ("2h", 7200), (3, 3), ("1.5s", 1.5)])
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text,size", [(65536, 65536), ("64KiB", 65536), ("1MiB", 1 << 20), ("10kb", 10_000)])
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


def test_yaml_file_and_env_override(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("server:\n  port: 9000\nlimits:\n  max_message_size: 32KiB\n  idle_timeout: 1m\n")
    config = load_config(path, environ={"FORGE_STREAMING__SERVER__PORT": "9100",
                                        "FORGE_STREAMING__API__KEY": "s3cret"})
    assert config.server.port == 9100
    assert config.limits.max_message_size == 32 * 1024
    assert config.limits.idle_timeout == 60
    assert config.api.key == "s3cret"


@pytest.mark.parametrize("raw,needles", [
    ({"server": {"port": "eighty"}}, ["server.port", "'eighty'"]),
    ({"server": {"prot": 80}}, ["server.prot", "unknown key"]),
    ({"limits": {"idle_timeout": "soon"}}, ["limits.idle_timeout", "duration", "'soon'"]),
    ({"serverr": {}}, ["serverr", "unknown section"]),
    ({"pubsub": {"mqtt": {"url": "x"}}}, ["pubsub.mqtt", "no installed plugin"]),
    ({"server": {"port": 70000}}, ["server.port", "65535"]),
])
def test_bad_values_name_the_key_value_and_expectation(raw: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(raw, environ={})
    for needle in needles:
        assert needle in str(info.value)


def test_bad_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_plugin_sections_are_validated_with_their_key() -> None:
    class Settings(ConfigSection):
        url: str = "mqtt://127.0.0.1:1883"
        keepalive: Duration = 10.0

    class Plugin:
        @hookimpl
        def streaming_config_sections(self) -> dict[str, type[ConfigSection]]:
            return {"pubsub.example": Settings}

    streaming = Streaming({"pubsub": {"example": {"keepalive": "30s"}}}, plugins=[Plugin()])
    assert streaming.config.section("pubsub.example", Settings).keepalive == 30
    assert streaming.config.effective()["pubsub"]["example"]["keepalive"] == 30
    with pytest.raises(ConfigError, match=r"pubsub\.example\.keepalive"):
        Streaming({"pubsub": {"example": {"keepalive": "never"}}}, plugins=[Plugin()])


def test_unknown_backend_names_what_is_available() -> None:
    with pytest.raises(ConfigError, match=r"pubsub.backend: 'redis' .*available: \['memory'"):
        Streaming({"pubsub": {"backend": "redis"}})


# -- every error at once, with suggestions (issue 17) ------------------------------------


def test_every_error_is_listed_with_did_you_mean() -> None:
    class Settings(ConfigSection):
        ping_interval: Duration = 20.0

    raw = {
        "server": {"prot": 80, "drain_timeout": "forever"},
        "limits": {"max_mesage_size": "1MiB"},
        "serverr": {},
        "example": {"ping_intervall": 3},
        "max_message_size": "1MiB",
    }
    with pytest.raises(ConfigError) as info:
        build_config(raw, sections={"example": Settings}, environ={})
    text = str(info.value)
    for needle in ["server.prot: unknown key", "did you mean 'port'",
                   "server.drain_timeout", "'forever'",
                   "limits.max_mesage_size", "did you mean 'max_message_size'",
                   "serverr: unknown section", "did you mean 'server'",
                   "example.ping_intervall", "did you mean 'ping_interval'",
                   "max_message_size: unknown section", "did you mean 'limits.max_message_size'"]:
        assert needle in text, f"{needle!r} missing from:\n{text}"
    assert text.count("\n  ") >= 6  # one line per problem


def test_timeout_keys_of_the_server_are_durations() -> None:
    config = build_config({"server": {"header_timeout": "5s", "body_timeout": "1m", "handshake_timeout": 2},
                           "limits": {"max_pending_connections": 50}}, environ={})
    assert (config.server.header_timeout, config.server.body_timeout, config.server.handshake_timeout) == (5, 60, 2)
    assert config.limits.max_pending_connections == 50
    defaults = build_config({}, environ={})
    assert defaults.server.header_timeout == 10 and defaults.server.body_timeout == 30
    assert defaults.limits.max_pending_connections is None


# -- Forge's config shape (issue 17) --------------------------------------------------------


def test_forge_extensions_streaming_shape_is_unwrapped_and_mapped() -> None:
    class WebSocketLike(ConfigSection):
        ping_interval: Duration = 20.0
        ping_timeout: Duration = 20.0
        read_buffer_size: int | None = None
        write_buffer_size: int | None = None
        enable_compression: bool = False

    raw = {"extensions": {"streaming": {
        "backend": "local",
        "enable_rooms": True,
        "enable_presence": True,
        "enable_message_history": True,
        "enable_typing_indicators": True,
        "enable_channels": False,
        "max_connections_per_user": 5,
        "max_message_size": 65536,
        "max_messages_per_second": 100,
        "max_messages_per_room": 500,
        "node_id": "node-1",
        "ping_interval": "30s",
        "pong_timeout": "10s",
        "read_buffer_size": 4096,
        "write_buffer_size": 4096,
        "websocket": {"enable_compression": True},
        "server": {"port": 9001},
    }}}
    config = build_config(raw, sections={"websocket": WebSocketLike}, environ={})
    assert config.pubsub.backend == "memory"
    assert config.server.port == 9001 and config.server.node_id == "node-1"
    assert config.limits.max_connections_per_user == 5 and config.limits.max_message_size == 65536
    assert config.limits.messages_per_second == 100
    assert config.rooms.history_size == 500
    ws = config.section("websocket", WebSocketLike)
    assert (ws.ping_interval, ws.ping_timeout, ws.read_buffer_size, ws.enable_compression) == (30, 10, 4096, True)
    no_history = build_config({"extensions": {"streaming": {"enable_message_history": False}}}, environ={})
    assert no_history.rooms.history_size == 0


def test_forge_keys_without_a_counterpart_are_refused_with_the_rewrite() -> None:
    raw = {"extensions": {"streaming": {
        "backend": "redis",
        "backend_urls": ["redis://localhost:6379"],
        "enable_channels": True,
        "max_rooms_per_user": 50,
        "message_retention": "720h",
        "tls_enabled": True,
    }, "database": {"dsn": "x"}}}
    with pytest.raises(ConfigError) as info:
        build_config(raw, environ={})
    text = str(info.value)
    for needle in ["extensions.streaming.backend: 'redis'", "pubsub:", "mqtt",
                   "extensions.streaming.backend_urls", "pubsub.mqtt.url",
                   "extensions.streaming.enable_channels", "rooms",
                   "extensions.streaming.max_rooms_per_user", "limits.max_rooms_per_connection",
                   "extensions.streaming.message_retention", "rooms.history_size",
                   "extensions.streaming.tls_enabled",
                   "extensions.database", "only extensions.streaming"]:
        assert needle in text, f"{needle!r} missing from:\n{text}"


def test_forge_shape_in_a_file_and_a_key_set_twice(tmp_path: Path) -> None:
    path = tmp_path / "forge.yaml"
    path.write_text("extensions:\n  streaming:\n    max_message_size: 1024\n    plugins:\n      deny: [webtransport]\n")
    config = load_config(path, environ={})
    assert config.limits.max_message_size == 1024 and config.plugins.deny == ["webtransport"]
    path.write_text("limits:\n  max_message_size: 2048\nextensions:\n  streaming:\n    max_message_size: 1024\n")
    with pytest.raises(ConfigError, match=r"limits.max_message_size.*set twice"):
        load_config(path, environ={})


def _even(value: int) -> int:
    if value % 2:
        raise ValueError(f"expected an even number, got {value!r}")
    return value


class _Checked(ConfigSection):
    """A plugin section with every kind of check the guide names."""

    pairs: Annotated[int, Meta(ge=2), Check(_even)] = 2
    names: tuple[str, ...] = ("a",)
    window: Annotated[Duration, Meta(le=1.0)] = 0.0
    low: int = 0
    high: int = 10

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError(f"expected low <= high, got {self.low} > {self.high}")


def test_a_section_s_meta_check_parse_and_post_init_are_applied_and_every_problem_named() -> None:
    section = _Checked.validate({"pairs": 4, "names": ["x", "y"], "window": "250ms"}, "example")
    assert (section.pairs, section.names, section.window) == (4, ("x", "y"), 0.25)
    with pytest.raises(ConfigError) as info:
        _Checked.validate({"pairs": 3, "names": "x", "window": "2s", "hihg": 1}, "example")
    lines = str(info.value).splitlines()[1:]
    assert lines == ["  example.pairs: expected an even number, got 3",
                     "  example.names: expected `array`, got 'x'",
                     "  example.window: expected `float` <= 1.0, got '2s'",
                     "  example.hihg: unknown key (value 1); did you mean 'high'?"], lines
    with pytest.raises(ConfigError, match=r"example: expected low <= high, got 5 > 1"):
        _Checked.validate({"low": 5, "high": 1}, "example")


def test_is_set_names_the_keys_the_file_and_environment_gave() -> None:
    config = build_config({"server": {"port": 8080}}, environ={"FORGE_STREAMING__LIMITS__MESSAGE_BURST": "5"})
    assert config.is_set("server.port"), "set, even to its default"
    assert config.is_set("limits.message_burst") and config.limits.message_burst == 5
    assert not config.is_set("server.host")
