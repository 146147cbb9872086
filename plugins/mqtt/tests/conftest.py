"""Shared fixtures: a real Mosquitto broker on a free loopback port, nodes as separate processes."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import pytest
import yaml
from forge_streaming.testing import free_port, wait_port
from forge_streaming_mqtt.topics import PROP_COUNT, PROP_KIND, PROP_NODE, PROP_PREVIOUS, PROP_SEQUENCE, Topics
from forge_streaming_mqtt.wire import UserProperties
from paho.mqtt.enums import CallbackAPIVersion

VENV_BIN = Path(sys.executable).parent
API_KEY = "test-key"


def mosquitto_path() -> str:
    found = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(found):
        pytest.skip("mosquitto is not installed")
    return found


class Broker:
    """A mosquitto process that a test may kill and restart on the same port."""

    def __init__(self, port: int, log_path: Path, config: list[str] | None = None, *, anonymous: bool = True) -> None:
        self.port = port
        self.url = f"mqtt://127.0.0.1:{port}"
        self.log_path = log_path
        self.config = config  # mosquitto.conf lines beyond the loopback listener
        self.anonymous = anonymous
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [mosquitto_path(), "-p", str(self.port)]
        if self.config is not None:
            conf = self.log_path.with_suffix(".conf")
            anonymous = f"allow_anonymous {'true' if self.anonymous else 'false'}"
            conf.write_text("\n".join([f"listener {self.port} 127.0.0.1", anonymous, *self.config]) + "\n")
            command = [mosquitto_path(), "-c", str(conf)]
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=out)
        wait_port(self.port)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One broker for the session (contract suites); tests that kill it use ``own_broker``."""
    b = Broker(free_port(), tmp_path_factory.mktemp("mosquitto") / "broker.log")
    b.start()
    try:
        yield b
    finally:
        b.kill()


_SEQUENCED: dict[tuple[str, str], int] = {}  # (prefix, room) -> the last position _publish_as_node gave


def _publish_as_node(port: int, prefix: str, room: str, node: str, counts: list[str],
                     marks: dict[str, str] | None = None, padding: int = 0) -> None:
    """Publish room messages numbered ``counts`` as node ``node`` would, once the sequencer numbered them
    (consecutive positions, each naming the one before), then its ``marks``, with plain paho."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv5)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        topics = Topics(prefix)
        infos = []
        for count in counts:
            previous = _SEQUENCED.get((prefix, room))
            position = _SEQUENCED[(prefix, room)] = (previous or 1000) + 1
            pairs = [(PROP_KIND, "message"), (PROP_NODE, node), (PROP_COUNT, count), (PROP_SEQUENCE, str(position))]
            if previous is not None:
                pairs.append((PROP_PREVIOUS, str(previous)))
            payload = json.dumps({"count": count, "pad": "x" * padding}).encode()
            infos.append(client.publish(topics.messages(room), payload, 1,
                                        properties=UserProperties(pairs)))  # type: ignore[arg-type]
        if marks is not None:
            infos.append(client.publish(topics.marks(node), json.dumps(marks).encode(), 1))
        for info in infos:
            info.wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.fixture
def publish_as_node() -> Any:
    """``publish_as_node(port, prefix, room, node, counts)``: room messages as a node would publish them."""
    return _publish_as_node


@pytest.fixture
def small_queue_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker that queues at most one message per subscriber: any burst overflows it."""
    b = Broker(free_port(), tmp_path / "broker.log", config=["max_queued_messages 1"])
    b.start()
    try:
        yield b
    finally:
        b.kill()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(free_port(), tmp_path / "broker.log")
    b.start()
    try:
        yield b
    finally:
        b.kill()


ACL_EXAMPLE = Path(__file__).parent.parent / "acl.example"
# the users acl.example names: two nodes and a device, each with its own password
ACL_PASSWORDS = {"forge-node-1": "node-1-secret", "forge-node-2": "node-2-secret", "thermo-1": "device-secret"}


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker that admits only the users of a password file (made with mosquitto_passwd), with the
    plugin's acl.example as its ACL file, as shipped."""
    mosquitto_passwd = shutil.which("mosquitto_passwd")
    if mosquitto_passwd is None:
        pytest.skip("mosquitto_passwd is not installed")
    passwd = tmp_path / "passwd"
    for user, password in ACL_PASSWORDS.items():
        create = [] if passwd.exists() else ["-c"]
        subprocess.run([mosquitto_passwd, "-b", *create, str(passwd), user, password], check=True,
                       capture_output=True, timeout=10)
    # as root, mosquitto would switch to the user "mosquitto", who cannot read the test's directory
    b = Broker(free_port(), tmp_path / "broker.log", anonymous=False,
               config=[f"user {getpass.getuser()}", f"password_file {passwd}", f"acl_file {ACL_EXAMPLE}"])
    b.start()
    try:
        yield b
    finally:
        b.kill()


class Node:
    """A ``forge-streaming serve`` process with the MQTT backend and room store."""

    def __init__(self, name: str, broker: Broker, workdir: Path, **mqtt: Any) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.config_path = workdir / f"{name}.yaml"
        self.log_path = workdir / f"{name}.log"
        limits = mqtt.pop("limits", None)  # the kernel's limits section; everything else is pubsub.mqtt
        settings = {"url": broker.url, "keepalive": "2s", "reconnect_min": "50ms", "reconnect_max": "500ms",
                    "connect_timeout": "3s", **mqtt}
        config = {
            "server": {"node_id": name, "drain_timeout": "1s", "workers": 1},  # a node is one process (its PID)
            "pubsub": {"backend": "mqtt", "mqtt": settings},
            "rooms": {"store": "mqtt"},
            "api": {"key": API_KEY},
            "logging": {"level": "info"},
            **({"limits": limits} if limits else {}),
        }
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "forge-streaming"), "serve", "--host", "127.0.0.1", "--port", str(self.port),
                 "--config", str(self.config_path)], stdout=out, stderr=out)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node {self.name} exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"node {self.name} not healthy in time: {self.log_path.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # -- HTTP API ------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def publish(self, room: str, data: Any, user_id: str = "api") -> int:
        r = httpx.post(f"{self.url}/api/publish", json={"room_id": room, "data": data, "user_id": user_id},
                       headers=self._headers(), timeout=5)
        r.raise_for_status()
        return int(r.json()["sequence"])

    def rooms(self) -> dict[str, list[str]]:
        r = httpx.get(f"{self.url}/api/rooms", headers=self._headers(), timeout=5)
        r.raise_for_status()
        return {item["room_id"]: item["users"] for item in r.json()["rooms"]}

    def health(self) -> tuple[int, dict[str, Any]]:
        r = httpx.get(f"{self.url}/healthz", timeout=5)
        return r.status_code, r.json()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Any]:
    """``cluster(broker, "a", "b")`` starts nodes; all are stopped at the end."""
    nodes: list[Node] = []

    def make(broker: Broker, *names: str, **mqtt: Any) -> list[Node]:
        made = [Node(name, broker, tmp_path, **mqtt) for name in names]
        for node in made:
            nodes.append(node)
            node.start()
        return made

    try:
        yield make
    finally:
        for node in nodes:
            node.stop()


def wait_until(predicate: Any, timeout: float = 10.0, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {message}")
