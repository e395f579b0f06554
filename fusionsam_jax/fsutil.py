"""File-system helpers shared by the writers (converters, prepare): orphaned temporary folders
of killed runs, modes that follow the umask. No project imports (any layer may use it)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile

# What follows the prefix in a `tempfile.mkdtemp` name: [pid "-"] + 8 random characters.
_TEMP_TAIL = re.compile(r"^(?:(\d+)-)?[a-z0-9_]{8}(?:\.\w+)?$")


def pid_alive(pid: int) -> bool:
  """Whether a process `pid` exists on this host."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def temp_prefix(prefix: str) -> str:
  """`prefix` + this process's pid + "-": a temporary name `clean_orphans` can attribute."""
  return f"{prefix}{os.getpid()}-"


def clean_orphans(parent, prefixes) -> list[str]:
  """Removes the entries of `parent` named ``<prefix><pid>-*`` (made with `temp_prefix`) whose
  process is gone, and ``<prefix>*`` without a pid (older versions' names): what a killed
  writer left. A running writer's are kept. Returns the removed paths; never raises."""
  removed = []
  try:
    names = os.listdir(parent)
  except OSError:
    return removed
  for name in names:
    for prefix in prefixes:
      if not name.startswith(prefix):
        continue
      m = _TEMP_TAIL.match(name[len(prefix):])
      if not m or (m.group(1) and pid_alive(int(m.group(1)))):
        break
      path = os.path.join(parent, name)
      rmtree(path)
      if not os.path.lexists(path):
        removed.append(path)
      break
  return removed


def rmtree(path) -> None:
  """Removes a file or folder tree, read-only sub-folders included; never raises."""
  def retry(func, p, _):
    try:
      os.chmod(os.path.dirname(p), 0o700)
      func(p)
    except OSError:
      pass
  if os.path.islink(path) or os.path.isfile(path):
    try:
      os.unlink(path)
    except OSError:
      pass
    return
  shutil.rmtree(path, onerror=retry)


def umask() -> int:
  """The process's umask (read without changing it for longer than the call)."""
  m = os.umask(0o022)
  os.umask(m)
  return m


def chmod_like_new_dir(path) -> None:
  """Gives a `tempfile.mkdtemp` folder (mode 0700) the mode of a folder made by `os.makedirs`
  under the umask (0755 under umask 022)."""
  os.chmod(path, 0o777 & ~umask())


#: Prefix of the temporary files `atomic_file` makes (readers skip names starting with it;
#: `clean_orphans` removes those of dead processes).
TEMP_FILE_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_file(path, *, mode: int = 0o644, fsync: bool = True):
  """Yields a temporary path beside `path`; on normal exit the file written there is
  fsynced, given `mode` and renamed onto `path` (readers see the old file or the new one,
  never half of one); on an exception it is removed. The folder is created if needed.

      with atomic_file("out/x.json") as tmp:
        with open(tmp, "w") as f: f.write(text)
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  suffix = os.path.splitext(path)[1]
  fd, tmp = tempfile.mkstemp(prefix=temp_prefix(TEMP_FILE_PREFIX), suffix=suffix, dir=folder)
  os.close(fd)
  try:
    yield tmp
    if fsync:
      with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise


def atomic_write(path, data: str | bytes) -> None:
  """Writes `data` (text or bytes) to `path` atomically (`atomic_file`)."""
  with atomic_file(path) as tmp:
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
      f.write(data)


def atomic_write_json(obj, path, *, indent: int = 2) -> None:
  """Writes `obj` as JSON (NaN / Inf refused: strict JSON) to `path` atomically."""
  atomic_write(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")
