"""What the figures were measured on: cores, CPU model, memory, versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess

from .servers import node_dir

DISTRIBUTIONS = ["forge-streaming", "forge-streaming-websocket", "forge-streaming-sse",
                 "forge-streaming-webtransport", "forge-streaming-mqtt", "forge-streaming-nats", "uvicorn", "uvloop",
                 "httptools",
                 "starlette", "websockets", "python-socketio", "python-engineio", "sse-starlette", "aioquic"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) / 1024 / 1024
    except (OSError, ValueError, IndexError):
        return 0.0


def _command_version(command: list[str]) -> str:
    if shutil.which(command[0]) is None:
        return "not installed"
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def describe() -> dict[str, str]:
    info = {
        "cpu": f"{os.cpu_count()} cores, {_cpu_model()}",
        "memory": f"{_memory_gib():.0f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "node": _command_version(["node", "--version"]),
        "mosquitto": _command_version(["mosquitto", "-h"]),
    }
    ws_package = node_dir() / "node_modules" / "ws" / "package.json"
    if ws_package.exists():
        import json

        info["ws (npm)"] = json.loads(ws_package.read_text())["version"]
    for dist in DISTRIBUTIONS:
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = "not installed"
    return info
