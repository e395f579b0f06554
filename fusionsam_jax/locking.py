"""An exclusive lock on a folder (a training workdir, a generated data set being made), and
the removal of what killed runs left in it.

    with DirLock(workdir, say=print):     # raises `DirLockedError` naming the holder
      ...                                 # only this process writes the folder

The lock is ``fcntl.flock`` on ``<folder>/.lock``: the kernel releases it when its holder
exits, killed or not, so a lock never outlives its process (no stale lock can block a run).
The file records the holder (pid, host, time, command); a clean release empties it, so a
run that finds a record without a holder knows that the previous holder died (it says so,
and takes the lock over). While the lock is held, the temporary files and folders of
earlier (dead) runs in the folder are orphans: `remove_orphans` deletes them.

Only the process that holds the lock may remove temporaries; every writer of a locked
folder uses temporary names that `remove_orphans` knows.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from typing import Callable, Iterable

from fusionsam_jax.errors import SetupError

LOCK_FILE = ".lock"


class DirLockedError(SetupError):
  """Another live process holds the folder's lock."""


class DirLock:
  """Exclusive lock on `directory` (which must exist); `what` names it in messages
  ("workdir", "data folder"); `say` gets the one-line note when a dead holder's lock is
  taken over. `wait`: block until a live holder releases it (saying so) instead of raising
  `DirLockedError`."""

  def __init__(self, directory: str | os.PathLike, *, what: str = "workdir",
               say: Callable[[str], None] | None = None, wait: bool = False):
    self.directory = os.path.abspath(os.fspath(directory))
    self.path = os.path.join(self.directory, LOCK_FILE)
    self.what, self.say, self.wait = what, say, wait
    self._fd: int | None = None
    self.previous: dict | None = None   # the record of a dead holder, if one was taken over

  def acquire(self) -> "DirLock":
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _read_record(fd)
      if self.wait and e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        if self.say:
          self.say(f"waiting for {_describe(holder) if holder else 'another process'}, "
                   f"which holds {self.what} {self.directory}")
        fcntl.flock(fd, fcntl.LOCK_EX)
        return self._took(fd)
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      who = _describe(holder) if holder else "another process"
      raise DirLockedError(
          f"{self.what} {self.directory} is in use by {who} ({self.path}); wait for that "
          "run to end or stop it, or use another " + self.what) from None
    return self._took(fd)

  def _took(self, fd: int) -> "DirLock":
    self.previous = _read_record(fd)
    if self.previous and self.say:
      self.say(f"note: took over the lock of {self.what} {self.directory} from "
               f"{_describe(self.previous)}, which ended without releasing it")
    record = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
              "command": " ".join(sys.argv)[:500]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)   # an empty record: released cleanly
    finally:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def __enter__(self) -> "DirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _read_record(fd: int) -> dict | None:
  try:
    raw = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
  except OSError:
    return None
  if not raw:
    return None
  try:
    rec = json.loads(raw.splitlines()[0])
  except (json.JSONDecodeError, IndexError):
    return {"raw": raw[:100]}
  return rec if isinstance(rec, dict) else {"raw": raw[:100]}


def _describe(rec: dict) -> str:
  if "pid" not in rec:
    return f"an unknown process ({rec.get('raw', '')!r})"
  when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(rec.get("time", 0))))
  return f"pid {rec['pid']} on {rec.get('host', '?')} (since {when})"


def remove_orphans(directory: str | os.PathLike, patterns: Iterable[Callable[[str], bool]],
                   *, recursive_dirs: Iterable[str] = (),
                   say: Callable[[str], None] | None = None) -> list[str]:
  """Deletes the entries of `directory` (and of each existing subfolder in
  `recursive_dirs`, relative to it) whose name matches one of `patterns`; says what it
  removed in one line. Call only while holding the folder's `DirLock`. Returns the paths."""
  root = os.fspath(directory)
  removed = []
  for sub in ("", *recursive_dirs):
    d = os.path.join(root, sub)
    try:
      names = sorted(os.listdir(d))
    except (FileNotFoundError, NotADirectoryError):
      continue
    for n in names:
      if not any(p(n) for p in patterns):
        continue
      p = os.path.join(d, n)
      if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
      else:
        try:
          os.unlink(p)
        except FileNotFoundError:
          pass
      removed.append(p)
  if removed and say:
    shown = ", ".join(os.path.relpath(p, root) for p in removed[:5])
    more = f" and {len(removed) - 5} more" if len(removed) > 5 else ""
    say(f"note: removed {len(removed)} temporary file(s) left by an interrupted run in "
        f"{root}: {shown}{more}")
  return removed
