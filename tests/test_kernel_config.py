"""Config: YAML, environment overrides, durations and sizes, errors that name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from forge_streaming import ConfigError, ConfigSection, Duration, Streaming, hookimpl, load_config
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
