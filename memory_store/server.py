"""A local `chroma run` server for tests and benchmarks of the server mode.

Starts the ``chroma`` command that ships with the chromadb package on a free loopback port,
waits for its heartbeat with a bounded timeout, and stops it on exit. The command is looked
for beside the running interpreter first, so ``venv/bin/python -m pytest`` finds it without
an activated venv, then on PATH.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from memory_store.errors import MemoryStoreError

logger = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _beside_interpreter(interpreter_dir: Path, windows: bool) -> list[Path]:
    """Where pip puts chromadb's console script for this interpreter."""
    if windows:
        # A venv keeps python.exe and scripts in Scripts/; a base install has python.exe above Scripts/.
        return [interpreter_dir / "chroma.exe", interpreter_dir / "Scripts" / "chroma.exe"]
    return [interpreter_dir / "chroma"]


def chroma_executable() -> str:
    """Path of the ``chroma`` command: beside sys.executable first, then on PATH."""
    # Not resolved: a venv's python is a symlink into the base install, whose folder has no chroma.
    candidates = _beside_interpreter(Path(sys.executable).parent, windows=os.name == "nt")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    on_path = shutil.which("chroma")
    if on_path is not None:
        return on_path
    looked = ", ".join(str(c) for c in candidates)
    raise MemoryStoreError(
        f"the `chroma` command (installed with chromadb) is neither beside this Python ({looked}) nor on PATH"
    )


@contextmanager
def local_chroma_server(data_dir: Path, start_timeout_s: float = 30.0) -> Iterator[str]:
    """Run ``chroma run --path data_dir`` on 127.0.0.1; yields its URL ("http://127.0.0.1:PORT")."""
    exe = chroma_executable()
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = data_dir / "server.log"
    env = {**os.environ, "ANONYMIZED_TELEMETRY": "False"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [exe, "run", "--path", str(data_dir / "db"), "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            deadline = time.monotonic() + start_timeout_s
            while True:
                if proc.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    raise MemoryStoreError(f"chroma server exited with code {proc.returncode}: {tail}")
                try:
                    if httpx.get(f"{url}/api/v2/heartbeat", timeout=1.0).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise MemoryStoreError(f"chroma server at {url} gave no heartbeat within {start_timeout_s:g} s")
                time.sleep(0.1)
            logger.info("chroma server pid %d listening at %s", proc.pid, url)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
