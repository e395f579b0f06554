"""The train CLI re-runs itself once with glibc's huge-page tunable where the kernel gives
transparent huge pages on request (`driver.reexec_with_huge_pages`)."""

import os
import platform
import sys

import pytest

from fusionsam_jax.cli import driver


@pytest.fixture
def calls(tmp_path, monkeypatch):
  thp = tmp_path / "enabled"
  thp.write_text("always [madvise] never\n")
  monkeypatch.setattr(driver, "THP_ENABLED", str(thp))
  monkeypatch.setattr(sys, "platform", "linux")
  monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
  monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "fusionsam_jax.train", "--x=1"],
                      raising=False)
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.delenv("FUSIONSAM_HUGEPAGES", raising=False)
  seen = []
  monkeypatch.setattr(os, "execve", lambda path, argv, env: seen.append((path, argv, env)))
  return {"seen": seen, "thp": thp}


def test_reexec_adds_the_tunable_and_keeps_the_command(calls):
  driver.reexec_with_huge_pages()
  [(path, argv, env)] = calls["seen"]
  assert path == sys.executable
  assert argv == [sys.executable, "-m", "fusionsam_jax.train", "--x=1"]
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_reexec_appends_to_existing_tunables(calls, monkeypatch):
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
  driver.reexec_with_huge_pages()
  assert calls["seen"][0][2]["GLIBC_TUNABLES"] == (
      "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")


@pytest.mark.parametrize("case", ["already_set", "opted_out", "thp_never", "thp_always",
                                  "old_glibc", "not_glibc", "no_thp_file"])
def test_no_reexec(calls, monkeypatch, case):
  if case == "already_set":     # (the re-run process itself)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
  elif case == "opted_out":
    monkeypatch.setenv("FUSIONSAM_HUGEPAGES", "0")
  elif case == "thp_never":
    calls["thp"].write_text("always madvise [never]\n")
  elif case == "thp_always":    # every mapping gets huge pages already
    calls["thp"].write_text("[always] madvise never\n")
  elif case == "old_glibc":
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.31"))
  elif case == "not_glibc":
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
  elif case == "no_thp_file":
    calls["thp"].unlink()
  driver.reexec_with_huge_pages()
  assert calls["seen"] == []
