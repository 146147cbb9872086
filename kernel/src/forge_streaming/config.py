"""One typed configuration: YAML file, environment overrides, plugin sections.

The kernel's own keys are modelled here; each plugin adds its section
(``websocket``, ``sse``, ``pubsub.mqtt``, ...) through the
``streaming_config_sections`` hook, validated the same way. Unknown keys
are refused, so a typo never silently does nothing.

A section is a ``msgspec.Struct`` (:class:`ConfigSection`): msgspec
is already the kernel's frame parser, and it builds and checks these in
microseconds where a pydantic model cost a server ~60 ms of every start.
The fields' types say what is accepted (``Annotated[int, Meta(ge=1)]`` for
constraints, :data:`Duration` and :data:`Size` for ``15s`` and ``64KiB``,
:class:`Check` for a check of a plugin's own); :func:`build_config` checks
every key of every section and reports every problem at once.

Environment overrides: ``FORGE_STREAMING__SERVER__PORT=9000`` sets
``server.port`` (double underscore between levels); values are read as
YAML scalars, so ``true``, ``15s`` and ``[a, b]`` work.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import msgspec
from msgspec import Meta, field

from .errors import ConfigError

ENV_PREFIX = "FORGE_STREAMING__"
ENV_CONFIG_FILE = "FORGE_STREAMING_CONFIG"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 10**6, "mib": 2**20, "gb": 10**9, "gib": 2**30}

__all__ = ["Check", "ConfigSection", "Duration", "Meta", "Parse", "Size", "StreamingConfig", "build_config",
           "load_config"]


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


@dataclass(frozen=True, slots=True)
class Parse:
    """``Annotated`` metadata: turns the value as written (YAML, environment) into the field's type first.

    ``Duration`` is ``Annotated[float, Parse(parse_duration)]``: ``15s`` becomes 15.0 before the float
    (and any ``Meta`` constraint) is checked. The function raises ``ValueError`` saying what it expected.
    """

    function: Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class Check:
    """``Annotated`` metadata: a plugin's own check of a field, run on the converted value.

    The function returns the value to keep (it may normalise it) or raises ``ValueError`` saying what
    was expected and what it got; the message is reported with the key, among every other problem.
    """

    function: Callable[[Any], Any]


Duration = Annotated[float, Parse(parse_duration)]
"""Seconds; accepts ``15s``, ``1m``, ``500ms`` in files and the environment."""

Size = Annotated[int, Parse(parse_size)]
"""Bytes; accepts ``64KiB``, ``1MiB`` in files and the environment."""


class ConfigSection(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of every config section, the kernel's and the plugins'.

    Unknown keys are refused; defaults make an empty section valid. Values
    are checked by :func:`build_config` (or :meth:`validate`), which reads
    the fields' types; the constructor, for code and tests, takes values as
    they are. A check across fields goes in ``__post_init__`` (raise
    ``ValueError``). Read-only by convention: a server's sections are
    shared by every part of it (not frozen, so that a subclass needs no
    ``frozen=True`` of its own to satisfy type checkers).
    """

    @classmethod
    def validate(cls: type[Section], data: Mapping[str, Any] | None, key: str = "") -> Section:
        """The section from ``data`` as a config file holds it; ``ConfigError`` lists every problem."""
        section, problems = _check(cls, data, key, set())
        if section is None:
            raise _invalid(problems)
        return section

    def to_dict(self) -> dict[str, Any]:
        """Every key with its value, as JSON-compatible values (what ``forge-streaming config`` prints)."""
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]


class ServerSettings(ConfigSection):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8080
    node_id: str | None = None
    room_endpoints: bool = True
    drain_timeout: Duration = 5.0
    reconnect_hint: Duration = 1.0
    handler_grace: Duration = 5.0
    """How long a handler may run on after its connection ended before the kernel cancels it."""
    header_timeout: Duration = 10.0
    """A client must send a request's complete headers within this time of connecting (or of the
    previous response), else its socket is closed (408 if it had started); 0 turns the check off.
    Enforced by ``forge-streaming serve`` and the test kit, not under plain uvicorn."""
    body_timeout: Duration = 30.0
    """A request body (a POST) must arrive whole within this time of its headers, else 408; 0 turns it off."""
    handshake_timeout: Duration = 10.0
    """A WebSocket upgrade or a WebTransport CONNECT must be accepted or refused within this time."""
    workers: Annotated[int, Meta(ge=1)] | Literal["auto"] = "auto"
    """Processes ``forge-streaming serve`` runs on this node. Rooms span them through the pub/sub
    backend, so more than one needs a shared backend (MQTT, NATS), not memory. ``auto``: one per core
    this process may use (its CPU affinity and cgroup v2 quota) when the backend is shared and the port
    is a number, else one."""
    gc_thresholds: tuple[Annotated[int, Meta(ge=0)], Annotated[int, Meta(ge=0)], Annotated[int, Meta(ge=0)]] = (
        10_000, 10, 10)
    """What ``forge-streaming serve`` passes to :func:`gc.set_threshold` (Python's own: 700, 10, 10).

    With Python's, a server holding many connections runs a full collection every few seconds under
    load, each walking every connection's objects (0.15-0.2 s at 1,000 WebTransport sessions), though
    what it frees is nearly all freed by reference counting already. 10,000 young objects (cyclic
    garbage waits until then: a few MiB at most) leave no full collection in the bench's WebTransport
    case and the same idle memory per connection. Not applied under plain uvicorn."""


class PubSubSettings(ConfigSection):
    backend: str = "memory"
    """Plugins' backend sections (``pubsub.mqtt``) nest here; :func:`build_config` takes them out first."""


class RoomSettings(ConfigSection):
    store: str = "memory"
    history_size: Annotated[int, Meta(ge=0)] = 100
    history_max_rooms: Annotated[int, Meta(ge=1)] = 10_000
    history_linger: Duration = 30.0
    history_max_bytes: Size = 1024 * 1024
    """Bytes of encoded messages one room's history keeps at most (its oldest go first)."""
    history_total_bytes: Size = 64 * 1024 * 1024
    """Bytes of history all rooms keep together; past it the least recently active rooms lose their oldest."""


class LimitSettings(ConfigSection):
    max_message_size: Size = 64 * 1024
    send_buffer: Size = 1024 * 1024
    max_connections: Annotated[int, Meta(ge=1)] = 10_000
    max_connections_per_ip: Annotated[int, Meta(ge=1)] | None = None
    max_connections_per_user: Annotated[int, Meta(ge=1)] | None = None
    max_rooms_per_connection: Annotated[int, Meta(ge=1)] = 100
    messages_per_second: Annotated[float, Meta(gt=0)] | None = None
    message_burst: Annotated[int, Meta(ge=1)] = 20
    idle_timeout: Duration | None = None
    max_json_depth: Annotated[int, Meta(ge=2, le=256)] = 64
    """How deep client JSON may nest (a frame's own object is one level), on every path; deeper is refused."""
    max_pending_connections: Annotated[int, Meta(ge=1)] | None = None
    """Connections still sending their request headers; past it the oldest is closed. None: half the
    process's open-file limit, at most 1000 (``forge-streaming serve`` and the test kit)."""


class ApiSettings(ConfigSection):
    key: str | None = None


class PluginSettings(ConfigSection):
    allow: list[str] | None = None
    deny: list[str] = []


class LoggingSettings(ConfigSection):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


Section = TypeVar("Section", bound=ConfigSection)

_INTERNAL = ("sections", "explicit")
"""Fields of :class:`StreamingConfig` filled by :func:`build_config`, not keys of the file."""


class StreamingConfig(ConfigSection):
    """The whole configuration. Plugin sections live in ``sections``."""

    server: ServerSettings = field(default_factory=ServerSettings)
    pubsub: PubSubSettings = field(default_factory=PubSubSettings)
    rooms: RoomSettings = field(default_factory=RoomSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    plugins: PluginSettings = field(default_factory=PluginSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    sections: dict[str, Any] = {}
    """Plugin sections by dotted key (``"pubsub.mqtt"``)."""
    explicit: frozenset[str] = frozenset()
    """The dotted keys the file or the environment set (``"server.port"``), defaults left out."""

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

    def is_set(self, key: str) -> bool:
        """Whether the file or the environment gave the dotted ``key`` (even at its default value)."""
        return key in self.explicit

    def effective(self) -> dict[str, Any]:
        """Every key with its value in force, plugin sections included."""
        data = self.to_dict()
        for name in _INTERNAL:
            data.pop(name)
        for key, value in self.sections.items():
            target = data
            *parents, last = key.split(".")
            for part in parents:
                target = target.setdefault(part, {})
            target[last] = value.to_dict()
        return data


# -- checking --------------------------------------------------------------------

_fields_cache: dict[type[ConfigSection], dict[str, Any]] = {}


def _fields(model: type[ConfigSection]) -> dict[str, Any]:
    """A section's keys and their types (the internal fields of the whole config left out)."""
    fields = _fields_cache.get(model)
    if fields is None:
        hidden = _INTERNAL if model is StreamingConfig else ()
        fields = {f.name: f.type for f in msgspec.structs.fields(model) if f.name not in hidden}
        _fields_cache[model] = fields
    return fields


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, ConfigSection)


def _convert(annotation: Any, value: Any) -> Any:
    """``value`` as a field of type ``annotation``: its ``Parse`` first, msgspec's conversion and ``Meta``
    constraints, then its ``Check``. ``Parse`` and ``Check`` count at the top of a field's type (or of
    the one type of an ``X | None``)."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = get_args(annotation)
        if value is None and type(None) in args:
            return None
        others = [arg for arg in args if arg is not type(None)]
        if len(others) == 1:
            annotation = others[0]
    metadata = getattr(annotation, "__metadata__", ()) if get_origin(annotation) is Annotated else ()
    for item in metadata:
        if isinstance(item, Parse):
            value = item.function(value)
    value = msgspec.convert(value, annotation, strict=False)
    for item in metadata:
        if isinstance(item, Check):
            value = item.function(value)
    return value


def _choices(annotation: Any) -> list[str]:
    """What a type with ``Literal`` values accepts, in words: ``'auto'``, ``a value of type int``."""
    if get_origin(annotation) is Literal:
        return [repr(arg) for arg in get_args(annotation)]
    if get_origin(annotation) in (Union, types.UnionType, Annotated):
        args = get_args(annotation)[:1] if get_origin(annotation) is Annotated else get_args(annotation)
        return [choice for arg in args for choice in _choices(arg)]
    return [] if annotation is type(None) else [f"a value of type {getattr(annotation, '__name__', annotation)}"]


def _message(exc: Exception, annotation: Any, value: Any) -> str:
    """What was expected and the value given: msgspec's ``Expected `int` >= 1``, or a check's own words."""
    if not isinstance(exc, msgspec.ValidationError):
        message = str(exc)
        return message if "got " in message else f"{message} (got {value!r})"
    message, at, path = str(exc).partition(" - at `$")
    message = re.sub(r", got (`[^`]*`|\d+)$", "", message)  # (the value itself follows)
    if message.startswith("Invalid enum value"):
        message = f"expected {' or '.join(_choices(annotation))}"
    elif message.startswith("Expected"):
        message = "e" + message[1:]
    return f"{message}, got {value!r}" + (f" (at item {path.rstrip('`')})" if at else "")


def _check(model: type[Section], data: Any, prefix: str, given: set[str]) -> tuple[Section | None, list[str]]:
    """Validate one section: the section, or every problem with it (one line each).

    The dotted keys ``data`` sets are added to ``given``.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        return None, [f"{prefix or 'config'}: expected a mapping of keys, got {data!r}"]
    fields = _fields(model)
    values: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        annotation = fields.get(key)
        if annotation is None:
            known = list(fields)
            hint = _did_you_mean(str(key), known) or (f"; expected one of {sorted(known)}" if known
                                                      else "; check its spelling")
            problems.append(f"{where}: unknown key (value {value!r}){hint}")
        elif _is_section(annotation):
            section, found = _check(annotation, value, where, given)
            problems += found
            values[key] = section
        else:
            given.add(where)
            try:
                values[key] = _convert(annotation, value)
            except (msgspec.ValidationError, ValueError, TypeError) as exc:
                problems.append(f"{where}: {_message(exc, annotation, value)}")
    if problems:
        return None, problems
    try:
        return model(**values), []
    except (ValueError, TypeError) as exc:  # a check across fields (__post_init__)
        return None, [f"{prefix or 'config'}: {exc}"]


def _did_you_mean(key: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _invalid(problems: Iterable[str]) -> ConfigError:
    lines = "\n  ".join(dict.fromkeys(problems))
    return ConfigError(f"invalid configuration:\n  {lines}")


# -- loading --------------------------------------------------------------------


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML config file into a dict; say which file and why when it fails."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(p)!r}: {exc.strerror}") from None
    import yaml  # only when a file or an override is read: its import (~8 ms) is not on a file-less start

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections, got {type(data).__name__}")
    unwrapped, _ = unwrap_forge(data)  # what cannot be unwrapped stays under extensions: build_config names it
    return unwrapped


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
        import yaml

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
    Every problem is reported at once (one line each, with a "did you mean"
    for a misspelt key). Forge's shape, ``extensions: {streaming: ...}``, is
    unwrapped first (see :func:`unwrap_forge`).
    """
    data, problems = unwrap_forge(raw or {})
    overrides, env_problems = unwrap_forge(env_overrides(environ))
    problems += env_problems
    data = merge(data, overrides)
    data.pop("extensions", None)  # what was left of it is in ``problems``
    data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    sections = dict(sections or {})
    plugin_values: dict[str, Any] = {}
    given: set[str] = set()
    for key, model in sorted(sections.items(), key=lambda kv: -kv[0].count(".")):
        value, found = _check(model, _pop_path(data, key), key, given)
        problems += found
        if value is not None:
            plugin_values[key] = value
    for parent in ("pubsub", "rooms"):
        section = data.get(parent)
        if not isinstance(section, dict):
            continue  # the model says what is wrong with it
        own = _own_keys(parent)
        nested = {k.split(".", 1)[1] for k in sections if k.startswith(parent + ".")}
        for key in [k for k in section if k not in own]:
            problems.append(f"{parent}.{key}: unknown key; no installed plugin owns this section "
                            f"(value {section.pop(key)!r}){_did_you_mean(key, own | nested)}")
    fields = set(_fields(StreamingConfig))
    roots = fields | {key.split(".")[0] for key in sections}
    for key in sorted(set(data) - fields, key=str):
        value = data.pop(key)
        hint = _did_you_mean(str(key), roots)
        if not hint:
            owners = [f"{name}.{key}" for name, model in _section_models(sections) if key in _fields(model)]
            hint = f"; did you mean {owners[0]!r}?" if owners else ""
        problems.append(f"{key}: unknown section (value {value!r}){hint}; expected one of {sorted(roots)}")
    config, found = _check(StreamingConfig, data, "", given)
    problems += found
    if config is None or problems:
        raise _invalid(problems)
    return msgspec.structs.replace(config, sections=plugin_values, explicit=frozenset(given))


def _section_models(sections: Mapping[str, type[ConfigSection]]) -> list[tuple[str, type[ConfigSection]]]:
    """Every section's model by dotted key, the kernel's first."""
    kernel = [(name, annotation) for name, annotation in _fields(StreamingConfig).items() if _is_section(annotation)]
    return kernel + sorted(sections.items())


# -- Forge's config shape ----------------------------------------------------------------

FORGE_KEYS: dict[str, str] = {
    "node_id": "server.node_id",
    "max_connections_per_user": "limits.max_connections_per_user",
    "max_message_size": "limits.max_message_size",
    "max_messages_per_second": "limits.messages_per_second",
    "max_messages_per_room": "rooms.history_size",
    "ping_interval": "websocket.ping_interval",
    "pong_timeout": "websocket.ping_timeout",
    "read_buffer_size": "websocket.read_buffer_size",
    "write_buffer_size": "websocket.write_buffer_size",
}
"""Keys of Forge's ``extensions.streaming`` with the same meaning here, and where they go."""

_TLS = ("clients' TLS is uvicorn's (--ssl-certfile, --ssl-keyfile) or your proxy's, WebTransport's is "
        "webtransport.cert_file and webtransport.key_file, the broker's is pubsub.mqtt.tls and pubsub.mqtt.ca_file")
_MQTT = "write pubsub: {backend: mqtt, mqtt: {url: mqtt://HOST:1883}} (plugins/mqtt)"

FORGE_SWITCHES: dict[str, tuple[bool, str]] = {
    "enable_rooms": (True, "rooms are always on"),
    "enable_presence": (True, "presence is always on (presence frames, GET /api/rooms)"),
    "enable_typing_indicators": (True, "typing frames are always relayed to the room"),
    "enable_channels": (False, "forge-streaming has no channels: use rooms (join a room, send messages to it)"),
    "enable_distributed": (False, "several nodes share rooms through the MQTT backend: " + _MQTT),
    "tls_enabled": (False, _TLS),
}
"""Forge's switches: the one value that holds here (accepted, changes nothing), and why the other cannot."""

FORGE_REFUSED: dict[str, str] = {
    "backend_urls": "the backend for several nodes is MQTT, at pubsub.mqtt.url: " + _MQTT,
    "backend_username": "write pubsub.mqtt.username (the MQTT backend's)",
    "backend_password": "write pubsub.mqtt.password (the MQTT backend's)",
    "max_rooms_per_user": "rooms are counted per connection here: write limits.max_rooms_per_connection",
    "max_channels_per_user": "forge-streaming has no channels; rooms per connection: limits.max_rooms_per_connection",
    "write_timeout": "a client that does not read is cut past limits.send_buffer (bytes), not after a write timeout",
    "message_retention": "history is kept by count, not age: write rooms.history_size (messages per room)",
    "message_cleanup": "the history of an empty room is let go after rooms.history_linger",
    "presence_timeout": "presence follows the connections; a silent WebSocket peer is cut after "
                        "websocket.ping_interval + websocket.ping_timeout",
    "presence_cleanup": "presence follows the connections; nothing to clean up",
    "typing_timeout": "typing frames are live-only notices; clients expire them",
    "typing_cleanup": "typing frames are live-only notices; nothing is stored",
    "max_typing_users_per_room": "typing frames are live-only notices; nothing is stored",
    "heartbeat_interval": "a node's liveness is its MQTT connection's: write pubsub.mqtt.keepalive",
    "node_timeout": "a node's liveness is its MQTT connection's: write pubsub.mqtt.keepalive",
    "tls_cert_file": _TLS,
    "tls_key_file": _TLS,
    "tls_ca_file": _TLS,
}
"""Forge keys with no counterpart here, and what to write instead."""

_MISSING = object()


def _get_path(data: Mapping[str, Any], dotted: str) -> Any:
    target: Any = data
    for part in dotted.split("."):
        if not isinstance(target, Mapping) or part not in target:
            return _MISSING
        target = target[part]
    return target


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> bool:
    """Set ``dotted`` in ``data``, copying the mappings on the way (the caller's stay as they were)."""
    *parents, last = dotted.split(".")
    target = data
    for part in parents:
        child = target.get(part, {})
        if not isinstance(child, Mapping):
            return False
        target[part] = dict(child)
        target = target[part]
    target[last] = copy.deepcopy(value)
    return True


def _merge_into(data: dict[str, Any], dotted: str, value: Any, where: str, problems: list[str]) -> Any:
    """Merge ``value`` at ``dotted``; what conflicts with a value already there is returned (else _MISSING)."""
    existing = _get_path(data, dotted)
    if existing is _MISSING:
        if _set_path(data, dotted, value):
            return _MISSING
        problems.append(f"{where}: cannot be set as {dotted}: a part of that key is not a mapping")
        return value
    if isinstance(existing, Mapping) and isinstance(value, Mapping):
        left = {}
        for key, item in value.items():
            rest = _merge_into(data, f"{dotted}.{key}", item, f"{where}.{key}", problems)
            if rest is not _MISSING:
                left[key] = rest
        return left or _MISSING
    if existing == value:
        return _MISSING
    problems.append(f"{dotted}: set twice, as {dotted} ({existing!r}) and as {where} ({value!r}); keep one")
    return value


def unwrap_forge(data: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Forge's ``extensions: {streaming: {...}}`` as this project's sections, and what cannot be.

    Sections of this project's own shape (``server:``, ``websocket:``, ...)
    inside it move up as they are; Forge's flat keys move to the key of the
    same meaning (:data:`FORGE_KEYS`, ``backend: local`` -> ``pubsub.backend:
    memory``, ``enable_message_history: false`` -> ``rooms.history_size: 0``).
    A Forge key with no counterpart, a switch that cannot hold here, a key set
    twice or another Forge extension is a problem (one line each, saying what
    to write instead) and stays under ``extensions`` in the returned data.
    """
    out = dict(data)
    extensions = out.pop("extensions", _MISSING)
    if extensions is _MISSING:
        return out, []
    if not isinstance(extensions, Mapping):
        out["extensions"] = extensions
        return out, [f"extensions: expected Forge's shape extensions: {{streaming: {{...}}}}, got {extensions!r}"]
    problems: list[str] = []
    left_over: dict[str, Any] = {}
    for name, value in extensions.items():
        if name != "streaming":
            left_over[name] = value
            problems.append(f"extensions.{name}: forge-streaming reads only extensions.streaming of a Forge "
                            f"config file; keep the other extensions' settings in another file")
    streaming = extensions.get("streaming")
    if streaming is not None and not isinstance(streaming, Mapping):
        left_over["streaming"] = streaming
        problems.append(f"extensions.streaming: expected a mapping of keys, got {streaming!r}")
        streaming = None
    streaming = streaming or {}
    left: dict[str, Any] = {}
    for key, value in streaming.items():
        where = f"extensions.streaming.{key}"
        target, new = FORGE_KEYS.get(key), value
        if key == "backend":
            name = str(value).lower()
            if name in ("redis", "nats"):
                problems.append(f"{where}: {value!r} is not available in forge-streaming; for one node write "
                                f"backend: local (pubsub.backend: memory); for several nodes {_MQTT}")
                left[key] = value
                continue
            target, new = "pubsub.backend", "memory" if name == "local" else value
        elif key == "enable_message_history" and value is False:
            target, new = "rooms.history_size", 0
        elif key == "enable_message_history" and value is True:
            continue
        elif key in FORGE_SWITCHES:
            holds, why = FORGE_SWITCHES[key]
            if key == "enable_distributed" and value is True and "mqtt" in (
                    str(streaming.get("backend")), str(_get_path(out, "pubsub.backend"))):
                continue  # several nodes over MQTT: what Forge's switch asks for
            if value is not holds:
                problems.append(f"{where}: {value!r} cannot hold in forge-streaming (only {holds!r} does): {why}")
                left[key] = value
            continue
        elif key in FORGE_REFUSED:
            problems.append(f"{where}: no counterpart in forge-streaming (value {value!r}); {FORGE_REFUSED[key]}")
            left[key] = value
            continue
        rest = _merge_into(out, target or key, new, where, problems)
        if rest is not _MISSING:
            left[key] = rest if target is None else value
    if left:
        left_over["streaming"] = left
    if left_over:
        out["extensions"] = left_over
    return out, problems


def _own_keys(parent: str) -> set[str]:
    return set(_fields(PubSubSettings if parent == "pubsub" else RoomSettings))


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
