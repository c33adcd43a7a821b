"""``vllm serve`` in a subprocess for the server tests: start, wait until ready, always stop.

The server runs in its own process group (API server and engine core), on a free localhost
port, with its log in a file; :func:`serve` yields a :class:`Server` and kills the group at the
end whatever happened.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vllm_harness import REPO_ROOT

#: Seconds the server may take to answer /v1/models (compile and graph capture included).
STARTUP_TIMEOUT_S = 600


@dataclass
class Server:
    """A running ``vllm serve``: its OpenAI base URL, process and log file."""

    base_url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


class ServerStartError(RuntimeError):
    """The server exited or did not become ready; the message ends with its log's last lines."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command() -> list[str]:
    """``vllm serve`` (the CLI when on PATH, else the module)."""
    vllm_cli = shutil.which("vllm")
    return [vllm_cli, "serve"] if vllm_cli else [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]


def is_ready(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/v1/models", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after 60 s."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)


@contextmanager
def serve(model: Path, served_name: str, args: list[str], env: dict[str, str], log_path: Path,
          startup_timeout_s: int = STARTUP_TIMEOUT_S) -> Iterator[Server]:
    """Runs ``vllm serve model --served-model-name served_name *args`` until the block ends.

    Raises :class:`ServerStartError` when the server exits or is not ready in time.
    """
    port = free_port()
    command = serve_command() + [str(model), "--host", "127.0.0.1", "--port", str(port),
                                 "--served-model-name", served_name, *args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                                   start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not is_ready(server.base_url):
            if process.poll() is not None:
                raise ServerStartError(f"vllm serve exited with {process.returncode}; log {log_path}:\n"
                                       + server.log_tail())
            if time.monotonic() > deadline:
                raise ServerStartError(f"vllm serve not ready after {startup_timeout_s} s; log {log_path}:\n"
                                       + server.log_tail())
            time.sleep(2)
        yield server
    finally:
        stop(process)
