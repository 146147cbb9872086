"""One typed configuration: YAML file, environment overrides, plugin sections.

The kernel's own keys are modelled here; each plugin adds its section
(``websocket``, ``sse``, ``pubsub.mqtt``, ...) through the
``streaming_config_sections`` hook, validated the same way. Unknown keys
are refused, so a typo never silently does nothing.

Environment overrides: ``FORGE_STREAMING__SERVER__PORT=9000`` sets
``server.port`` (double underscore between levels); values are read as
YAML scalars, so ``true``, ``15s`` and ``[a, b]`` work.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from .errors import ConfigError

ENV_PREFIX = "FORGE_STREAMING__"
ENV_CONFIG_FILE = "FORGE_STREAMING_CONFIG"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 10**6, "mib": 2**20, "gb": 10**9, "gib": 2**30}


def parse_duration(value: Any) -> float:
    """``15s``, ``1m``, ``500ms``, ``2h`` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 15s, 1m or 500ms, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"expected a duration like 15s, 1m or 500ms, got {value!r}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError(f"expected a duration of zero or more, got {value!r}")
    return seconds


def parse_size(value: Any) -> int:
    """``65536``, ``64KiB``, ``1MiB`` -> bytes."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 65536, 64KiB or 1MiB, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ValueError(f"expected a size like 65536, 64KiB or 1MiB, got {value!r}")
        unit = match.group(2).lower() if match.group(2) else None
        size = int(match.group(1)) * _SIZE_UNITS[unit]
    if size < 0:
        raise ValueError(f"expected a size of zero or more, got {value!r}")
    return size


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds; accepts ``15s``, ``1m``, ``500ms`` in files and the environment."""

Size = Annotated[int, BeforeValidator(parse_size)]
"""Bytes; accepts ``64KiB``, ``1MiB`` in files and the environment."""


class ConfigSection(BaseModel):
    """Base of every config section, the kernel's and the plugins'.

    Unknown keys are refused; defaults make an empty section valid.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ServerSettings(ConfigSection):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    node_id: str | None = None
    room_endpoints: bool = True
    drain_timeout: Duration = 5.0
    reconnect_hint: Duration = 1.0
    handler_grace: Duration = 5.0
    """How long a handler may run on after its connection ended before the kernel cancels it."""


class PubSubSettings(ConfigSection):
    model_config = ConfigDict(extra="allow", frozen=True)
    backend: str = "memory"


class RoomSettings(ConfigSection):
    model_config = ConfigDict(extra="allow", frozen=True)
    store: str = "memory"
    history_size: int = Field(100, ge=0)
    history_max_rooms: int = Field(10_000, ge=1)
    history_linger: Duration = 30.0


class LimitSettings(ConfigSection):
    max_message_size: Size = 64 * 1024
    send_buffer: Size = 1024 * 1024
    max_connections: int = Field(10_000, ge=1)
    max_connections_per_ip: int | None = Field(None, ge=1)
    max_connections_per_user: int | None = Field(None, ge=1)
    max_rooms_per_connection: int = Field(100, ge=1)
    messages_per_second: float | None = Field(None, gt=0)
    message_burst: int = Field(20, ge=1)
    idle_timeout: Duration | None = None


class ApiSettings(ConfigSection):
    key: str | None = None


class PluginSettings(ConfigSection):
    allow: list[str] | None = None
    deny: list[str] = Field(default_factory=list)


class LoggingSettings(ConfigSection):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


Section = TypeVar("Section", bound=ConfigSection)


class StreamingConfig(ConfigSection):
    """The whole configuration. Plugin sections live in ``sections``."""

    server: ServerSettings = ServerSettings()
    pubsub: PubSubSettings = PubSubSettings()
    rooms: RoomSettings = RoomSettings()
    limits: LimitSettings = LimitSettings()
    api: ApiSettings = ApiSettings()
    plugins: PluginSettings = PluginSettings()
    logging: LoggingSettings = LoggingSettings()
    sections: dict[str, Any] = Field(default_factory=dict, exclude=True)

    def section(self, key: str, model: type[Section] | None = None) -> Section:
        """A plugin's validated section by dotted key (``"websocket"``, ``"pubsub.mqtt"``)."""
        try:
            value = self.sections[key]
        except KeyError:
            if model is None:
                raise ConfigError(f"no plugin registered the config section {key!r}") from None
            return model()
        if model is not None and not isinstance(value, model):
            raise ConfigError(f"config section {key!r} is a {type(value).__name__}, not {model.__name__}")
        return value  # type: ignore[no-any-return]

    def effective(self) -> dict[str, Any]:
        """Every key with its value in force, plugin sections included."""
        data = self.model_dump(mode="json")
        for key, value in self.sections.items():
            target = data
            *parents, last = key.split(".")
            for part in parents:
                target = target.setdefault(part, {})
            target[last] = value.model_dump(mode="json")
        return data


# -- loading --------------------------------------------------------------------


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML config file into a dict; say which file and why when it fails."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(p)!r}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``FORGE_STREAMING__A__B=v`` -> ``{"a": {"b": v}}`` with YAML-typed values."""
    environ = os.environ if environ is None else environ
    result: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not parts:
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        target = result
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"environment variable {name} conflicts with another override")
        target[parts[-1]] = value
    return result


def merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base``."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe_error(err: Mapping[str, Any], prefix: str) -> str:
    key = ".".join(str(part) for part in (prefix, *err["loc"]) if part != "")
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key (value {err['input']!r}); check its spelling"
    message = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if "got " not in message:
        message += f" (got {err.get('input')!r})"
    return f"{key}: {message}"


def _validate(model: type[Section], data: Any, prefix: str) -> Section:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "\n  ".join(_describe_error(e, prefix) for e in exc.errors())
        raise ConfigError(f"invalid configuration:\n  {problems}") from None


def _pop_path(data: dict[str, Any], dotted: str) -> Any:
    *parents, last = dotted.split(".")
    target: Any = data
    for part in parents:
        target = target.get(part) if isinstance(target, dict) else None
        if target is None:
            return None
    if isinstance(target, dict):
        return target.pop(last, None)
    return None


def build_config(
    raw: Mapping[str, Any] | None = None,
    *,
    sections: Mapping[str, type[ConfigSection]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> StreamingConfig:
    """Validate raw config (file contents) plus environment overrides.

    ``sections`` are the plugin sections by dotted key; their subtrees are
    validated with the plugin's model and kept in ``config.sections``.
    """
    data = merge(dict(raw or {}), env_overrides(environ))
    data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    plugin_values: dict[str, Any] = {}
    for key, model in sorted((sections or {}).items(), key=lambda kv: -kv[0].count(".")):
        plugin_values[key] = _validate(model, _pop_path(data, key), key)
    for parent in ("pubsub", "rooms"):
        extra = {k: v for k, v in (data.get(parent) or {}).items() if k not in _own_keys(parent)}
        for key in extra:
            raise ConfigError(
                f"{parent}.{key}: unknown key; no installed plugin owns this section (value {extra[key]!r})"
            )
    unknown = (set(data) - set(StreamingConfig.model_fields)) | ({"sections"} & set(data))
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(
            f"{key}: unknown section (value {data[key]!r}); expected one of "
            f"{sorted(set(StreamingConfig.model_fields) - {'sections'} | set(sections or {}))}"
        )
    config = _validate(StreamingConfig, data, "")
    return config.model_copy(update={"sections": plugin_values})


def _own_keys(parent: str) -> set[str]:
    fields = PubSubSettings.model_fields if parent == "pubsub" else RoomSettings.model_fields
    return set(fields)


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    sections: Mapping[str, type[ConfigSection]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> StreamingConfig:
    """Load a YAML file (or ``$FORGE_STREAMING_CONFIG``) with environment overrides."""
    env = os.environ if environ is None else environ
    path = path or env.get(ENV_CONFIG_FILE)
    raw = read_yaml(path) if path else {}
    return build_config(raw, sections=sections, environ=env)
