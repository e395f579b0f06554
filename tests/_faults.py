"""Fault injection for the CLI tests (not collected: no test_ prefix): a command run with a
small (or read-only) tmpfs mounted at a folder, in a private mount namespace (``unshare -rm``,
no root needed where user namespaces are enabled). Tests skip with the reason where no
namespace can be made."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

_SCRIPT = ('set -e; d="$1"; size="$2"; ro="$3"; shift 3; '
           'mount -t tmpfs -o "size=$size" tmpfs "$d"; '
           'if [ "$ro" = ro ]; then mount -o remount,ro "$d"; fi; exec "$@"')


def on_tmpfs(cmd: list[str], mount_dir, size: str = "256k", read_only: bool = False,
             **kw) -> subprocess.CompletedProcess:
  """Runs `cmd` with a fresh tmpfs of `size` at `mount_dir` (created if absent), read-only
  with `read_only`; skips the test where that is impossible here."""
  os.makedirs(mount_dir, exist_ok=True)
  if not shutil.which("unshare"):
    pytest.skip("no unshare(1): cannot mount a small tmpfs to fill")
  probe = subprocess.run(["unshare", "-rm", "sh", "-c", _SCRIPT, "sh", str(mount_dir), "64k",
                          "rw", "true"], capture_output=True, text=True)
  if probe.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()[:200]}")
  return subprocess.run(["unshare", "-rm", "sh", "-c", _SCRIPT, "sh", str(mount_dir), size,
                         "ro" if read_only else "rw", *cmd], capture_output=True, text=True,
                        **kw)
