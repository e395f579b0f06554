"""benchmarks/gpu_soak.py: what ended a child (a signal, a shell's 128 + signal), the
faulthandler dump of a child that dies of SIGSEGV, the last metrics row of a killed run,
the crash rate per command; and (extended) the whole script on the tiny config on CPU."""

import json
import os
import signal
import subprocess
import sys

import pytest

from benchmarks import gpu_soak as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_exit_status_names_the_signal_that_ended_a_child():
  assert S.exit_status(-signal.SIGSEGV) == {"signal": "SIGSEGV", "crashed": True}
  assert S.exit_status(128 + signal.SIGSEGV) == {"signal": "SIGSEGV", "crashed": True}
  assert S.exit_status(-signal.SIGABRT)["crashed"]
  # Killed on purpose or an error exit: not a crash.
  assert S.exit_status(-signal.SIGKILL) == {"signal": "SIGKILL", "crashed": False}
  for rc in (0, 1, 2, "timeout"):
    assert not S.exit_status(rc)["crashed"]


def test_a_child_killed_by_sigsegv_is_a_crash_with_its_stack(tmp_path):
  """A real child that faults inside a nested call, with PYTHONFAULTHANDLER=1 as the soak
  sets it (not enabled by the child itself), while a second thread is alive."""
  work = tmp_path / "run"
  work.mkdir()
  # A killed run leaves half a row: the last whole one is reported.
  (work / "metrics.jsonl").write_text(
      '{"step": 4, "split": "segmentation/train", "loss": 1.5}\n{"step": 4, "spl')
  code = ("import os, signal, threading, time\n"
          "threading.Thread(target=time.sleep, args=(60,), daemon=True, name='reader').start()\n"
          "def evaluate_batch():\n"
          "  os.kill(os.getpid(), signal.SIGSEGV)\n"
          "def val_pass():\n"
          "  evaluate_batch()\n"
          "print('step 4', flush=True)\n"
          "val_pass()\n")
  env = S.child_env(1)
  rec = S.run_command([sys.executable, "-c", code], str(tmp_path / "child.log"), env,
                      timeout=60, workdir=str(work))
  assert rec["returncode"] == -signal.SIGSEGV
  assert rec["signal"] == "SIGSEGV" and rec["crashed"]
  stack = rec["fault_stack"]
  assert stack.startswith("Fatal Python error: Segmentation fault")
  # The faulting thread first, innermost frame first, then the other thread.
  cur = stack.index("Current thread")
  assert cur < stack.index("evaluate_batch") < stack.index("val_pass")
  assert stack.count("Thread 0x") >= 1 and "time.sleep" not in stack[:cur]
  assert rec["fault_in_python_thread"] is True
  assert rec["last_metrics_row"] == {"step": 4, "split": "segmentation/train", "loss": 1.5}
  # The report counts it per command.
  ok = dict(rec, returncode=0, signal=None, crashed=False, fault_stack=None)
  runs = [{"index": 0, "cold": True, "commands": {"train": ok}},
          {"index": 1, "cold": False, "commands": {"train": rec, "evaluate": ok}},
          {"index": 2, "cold": False, "commands": {"train": ok,
                                                   "evaluate": dict(ok, returncode=1)}}]
  s = S.summarize(runs)
  assert s["train_warm"]["runs"] == 2 and s["train_warm"]["crashes"] == 1
  assert s["train_warm"]["crash_rate"] == 0.5
  assert s["train_cold"]["crashes"] == 0 and s["train"]["runs"] == 3
  assert s["evaluate"] == dict(s["evaluate"], runs=2, crashes=0, failures=1, timeouts=0)


def test_a_fault_in_a_thread_that_runs_no_python_is_told_apart(tmp_path):
  """A SIGSEGV in a native thread (as an XLA / CUDA thread would fault) while the main thread
  waits: the dump marks no thread "Current thread", and the record says so."""
  code = ("import ctypes, signal, time\n"
          "libc = ctypes.CDLL(None)\n"
          "tid = ctypes.c_ulong()\n"
          "start = ctypes.cast(libc.pause, ctypes.c_void_p)\n"
          "assert libc.pthread_create(ctypes.byref(tid), None, start, None) == 0\n"
          "time.sleep(0.2)\n"
          "def wait_for_device():\n"
          "  libc.pthread_kill(tid, signal.SIGSEGV)\n"
          "  time.sleep(30)\n"
          "wait_for_device()\n")
  rec = S.run_command([sys.executable, "-c", code], str(tmp_path / "child.log"), S.child_env(1),
                      timeout=60)
  assert rec["crashed"] and rec["signal"] == "SIGSEGV"
  assert "wait_for_device" in rec["fault_stack"] and "Current thread" not in rec["fault_stack"]
  assert rec["fault_in_python_thread"] is False


def test_fault_stack_is_the_last_dump():
  text = "noise\nFatal Python error: Aborted\nold\nmore\nFatal Python error: Segmentation fault\n"
  assert S.fault_stack(text) == "Fatal Python error: Segmentation fault\n"
  assert S.fault_stack("Traceback (most recent call last):\nValueError") is None


@pytest.mark.extended
def test_soak_script_end_to_end_on_the_tiny_config(tmp_path):
  """The user's path once (tiny random SAM .pth -> convert -> generate -> prepare -> train ->
  evaluate -> predict) through the script, with its SIGSEGV self check: 3-9 min on 2 cores."""
  out = tmp_path / "soak.json"
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  r = subprocess.run([sys.executable, "benchmarks/gpu_soak.py", "--variant", "tiny",
                      "--scenes", "8", "--height", "96", "--width", "128", "--runs", "1",
                      "--eval_every_run", "1", f"--scratch={tmp_path / 'scratch'}",
                      f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  rep = json.loads(out.read_text())
  assert rep["self_check"]["ok"] and rep["self_check"]["signal"] == "SIGSEGV"
  assert "Segmentation fault" in rep["self_check"]["fault_stack"]
  assert all(rep["setup"][k]["returncode"] == 0 for k in ("convert", "generate", "prepare"))
  (run,) = rep["runs"]
  assert run["cold"] and set(run["commands"]) == {"train", "evaluate", "predict"}
  assert all(c["returncode"] == 0 and not c["crashed"] for c in run["commands"].values())
  train = run["commands"]["train"]
  assert train["last_metrics_row"]["step"] == 4
  assert train["stage_events"]["segmentation"]["eval_s"]
  for cmd in ("train_cold", "evaluate", "predict"):
    assert rep["summary"][cmd] == dict(rep["summary"][cmd], runs=1, crashes=0, crash_rate=0.0)
  assert rep["child_env"]["PYTHONFAULTHANDLER"] == "1"
