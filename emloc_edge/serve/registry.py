"""The servable tasks: every `*.emloc` file in the memories folder, named by its stem, looked up afresh on
each request, so files added (or replaced) while the server runs are served without a restart."""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from ..errors import EmlocError
from ..memory import TaskMemory
from .errors import UnknownMemoryError

SUFFIX = ".emloc"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # file stems only: no separators, no hidden files


class MemoryRegistry:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UnknownMemoryError(f"{self.folder}: no such memories folder")
        self._summaries: dict[str, tuple[tuple[int, int], dict]] = {}  # name -> ((mtime_ns, size), summary)
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        with os.scandir(self.folder) as entries:
            return sorted(e.name[: -len(SUFFIX)] for e in entries
                          if e.name.endswith(SUFFIX) and _NAME.match(e.name[: -len(SUFFIX)]) and e.is_file())

    def path(self, name: str) -> Path:
        """The memory file of `name`, or UnknownMemoryError (404)."""
        path = self.folder / f"{name}{SUFFIX}"
        if not _NAME.match(name) or not path.is_file():
            raise UnknownMemoryError(f"model {name!r}: no such task memory on this server (GET /v1/models lists them)")
        return path

    def summary(self, name: str) -> dict:
        """`inspect --json` of the memory, cached while the file's mtime and size stay; an unreadable file
        gives {"error": ...} rather than hiding the others."""
        path = self.path(name)
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._summaries.get(name)
        if cached and cached[0] == stamp:
            return cached[1]
        try:
            summary = TaskMemory.load(path).summary(stat.st_size)
        except EmlocError as e:
            summary = {"error": str(e).replace(f"{self.folder}{os.sep}", "")}
        with self._lock:
            self._summaries[name] = (stamp, summary)
        return summary
