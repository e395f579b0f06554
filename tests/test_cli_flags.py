"""Every CLI on absl flags: one-line usage errors (exit 2), the old hyphenated spellings."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: (argv prefix, a required flag) of every command-line tool of the project.
CLIS = {
    "predict": ([sys.executable, "-m", "fusionsam_jax.predict"], "--workdir"),
    "miou": ([sys.executable, "-m", "fusionsam_jax.metrics.miou"], "--pred_dir"),
    "sod": ([sys.executable, "-m", "fusionsam_jax.metrics.sod"], "--pred_dir"),
    "prepare": ([sys.executable, "-m", "fusionsam_jax.data.prepare"], "--dataset"),
    "generate": ([sys.executable, "-m", "fusionsam_jax.data.generate"], "--layout"),
    "convert_sam": ([sys.executable, os.path.join(ROOT, "tools", "convert_sam_weights.py")],
                    "--checkpoint"),
    "convert_sam2": ([sys.executable, os.path.join(ROOT, "tools", "convert_sam2_weights.py")],
                     "--checkpoint"),
    "evaluate": ([sys.executable, "-m", "fusionsam_jax.evaluate"], "--workdir"),
    "baseline": ([sys.executable, "-m", "fusionsam_jax.baseline"], "--workdir"),
    "report": ([sys.executable, "-m", "fusionsam_jax.evaluators.report"], "--workdir"),
    "convert_vgg16": ([sys.executable, os.path.join(ROOT, "tools", "convert_vgg16.py")],
                      "--weights"),
}


def _run(cmd):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _define(fv):
  from absl import flags
  return {"manual_dir": flags.DEFINE_string("manual_dir", None, "dir", flag_values=fv),
          "num": flags.DEFINE_integer("num", 3, "n", flag_values=fv),
          "progress": flags.DEFINE_bool("progress", True, "bar", flag_values=fv)}


def _cli(argv, **kw):
  from fusionsam_jax.cli.driver import run_cli
  seen = {}

  def body(f, rest):
    seen.update({k: h.value for k, h in f.items()}, rest=rest)
    return 0
  return run_cli(_define, body, argv, prog="t", doc="A test tool.", **kw), seen


def test_run_cli_spellings():
  # absl's --flag=value and --flag value; the argparse spellings are rewritten
  for argv in (["--manual_dir=a", "--num", "5", "--noprogress"],
               ["--manual-dir", "a", "--num=5", "--no-progress"],
               ["--manual-dir=a", "--num", "5", "--noprogress"]):
    rc, seen = _cli(argv)
    assert rc == 0 and seen == {"manual_dir": "a", "num": 5, "progress": False, "rest": []}
  rc, seen = _cli(["--manual_dir", "x", "--", "--num-x"], positional=True)
  assert rc == 0 and seen["rest"] == ["--num-x"]   # nothing rewritten after --


@pytest.mark.parametrize("argv,needle", [
    (["--nope=1"], "nope"), (["--num=x"], "--num"), (["--manual_dir"], "manual_dir"),
    (["--num-classes=3"], "num-classes"), (["stray"], "stray"), ([], "--manual_dir is required"),
])
def test_run_cli_usage_errors(argv, needle, capsys):
  rc, seen = _cli(argv, required=("manual_dir",))
  err = capsys.readouterr().err
  assert rc == 2 and not seen
  assert len(err.strip().splitlines()) == 1 and needle in err, err


def test_run_cli_help(capsys):
  rc, seen = _cli(["--help"])
  out = capsys.readouterr().out
  assert rc == 0 and not seen and "A test tool." in out and "--manual_dir" in out


@pytest.mark.parametrize("name", sorted(CLIS))
def test_every_cli_usage_error_is_one_line(name):
  cmd, required = CLIS[name]
  r = _run(cmd + ["--no_such_flag=1"])
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "no_such_flag" in r.stderr
  r = _run(cmd)
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert required in r.stderr
  r = _run(cmd + ["--help"])
  assert r.returncode == 0 and required in r.stdout, r.stderr


def test_no_argparse_left():
  """One flags library: absl, in every CLI of the package and tools/."""
  users = []
  for top in ("fusionsam_jax", "tools"):
    for d, _, files in os.walk(os.path.join(ROOT, top)):
      for fn in files:
        if fn.endswith(".py"):
          with open(os.path.join(d, fn)) as fh:
            if "import argparse" in fh.read():
              users.append(os.path.join(d, fn))
  assert not users


def test_config_override_error_is_one_line(tmp_path):
  """A --config.x override that names no field: a usage error, not ml_collections' traceback."""
  r = _run([sys.executable, "-m", "fusionsam_jax.evaluate", f"--workdir={tmp_path}",
            "--config=configs/demo.py:tiny", "--config.eval.no_such_key=2"])
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert "no_such_key" in r.stderr
