"""The suite's side of bench/peer_protocol.py: one worker subprocess per peer, kept open.

A worker that dies or stays silent past its time limit raises ``PeerFailed`` with the last
line it wrote to stderr (or the limit it ran past), which the suite records as the peer's
failure reason. Workers run in a session of their own so that a stuck one is ended with
everything it started (inductor's compile workers) and nothing else.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import tempfile
from pathlib import Path


class PeerFailed(RuntimeError):
    pass


class PeerWorker:
    def __init__(self, python: str, script: Path, env: dict[str, str] | None = None):
        self.name = script.name
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen([python, str(script)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr,
                                      env={**os.environ, **(env or {})},
                                      start_new_session=True)

    def ask(self, request: dict, timeout_s: float) -> dict:
        """Send one request and wait at most ``timeout_s`` for its answer line."""
        if self._proc.poll() is not None:
            raise PeerFailed(f"{self.name} exited earlier: {self._last_error()}")
        self._proc.stdin.write((json.dumps(request) + "\n").encode())
        self._proc.stdin.flush()
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout_s)
        if not ready:
            self.close()
            raise PeerFailed(f"no answer within {timeout_s:.0f} s")
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait()
            raise PeerFailed(self._last_error())
        return json.loads(line)

    def _last_error(self) -> str:
        self._stderr.seek(0)
        lines = [ln.strip() for ln in self._stderr.read().splitlines() if ln.strip()]
        code = self._proc.returncode
        return (lines[-1] if lines else "no message") + f" ({self.name} exit code {code})"

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)  # the worker's own session only
                self._proc.wait()
        self._stderr.close()
