"""The requests in flight on this worker, in a file that outlives the process.

A worker killed with -9 cannot say which requests it cut, so their callers got an error and the
ledger and the monitor saw nothing (the error-rate alert stayed "ok"). Each admitted request is
written here when it starts and again when it ends (one ``os.write`` each: the kernel keeps the bytes
when the process dies); the next worker on this data dir reads back what started and never ended and
publishes ``inference.failed`` for each. The file is emptied whenever nothing is in flight and it has
grown past ``COMPACT_BYTES``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

COMPACT_BYTES = 1 << 20


class InflightJournal:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._open = 0

    def cut_short(self) -> list[tuple[str, str]]:
        """(request id, model ref) of each request an earlier process started and never ended; the
        journal is emptied after (call once, at start, before any request)."""
        started: dict[str, str] = {}
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                op, request_id, *model = json.loads(line)
            except (ValueError, TypeError):  # a line cut by the kill: the request it names is lost either way
                continue
            if op == "+":
                started[request_id] = model[0] if model else "?"
            else:
                started.pop(request_id, None)
        os.ftruncate(self._fd, 0)
        return list(started.items())

    def started(self, request_id: str, model_ref: str) -> None:
        self._open += 1
        os.write(self._fd, (json.dumps(["+", request_id, model_ref]) + "\n").encode())

    def ended(self, request_id: str) -> None:
        self._open -= 1
        os.write(self._fd, (json.dumps(["-", request_id]) + "\n").encode())
        if self._open == 0 and os.fstat(self._fd).st_size > COMPACT_BYTES:
            os.ftruncate(self._fd, 0)

    def close(self) -> None:
        os.close(self._fd)
