"""A local `chroma run` server for tests and benchmarks of the server mode.

Starts the ``chroma`` command that ships with the chromadb package on a free loopback port,
waits for its heartbeat with a bounded timeout, and stops it on exit.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
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


@contextmanager
def local_chroma_server(data_dir: Path, start_timeout_s: float = 30.0) -> Iterator[str]:
    """Run ``chroma run --path data_dir`` on 127.0.0.1; yields its URL ("http://127.0.0.1:PORT")."""
    exe = shutil.which("chroma")
    if exe is None:
        raise MemoryStoreError("the `chroma` command (installed with chromadb) is not on PATH")
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
