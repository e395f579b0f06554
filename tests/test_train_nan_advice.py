"""The NaN guard's advice can be followed (issue 17, defect 11): it used to say 'lower the
learning rate, re-run the same command', which a changed config answers with exit 4."""

import os

import pytest

from _cli_helpers import tiny_config


def test_nan_advice_leads_to_a_resume_not_exit_4(tmp_path, monkeypatch, capsys):
  from fusionsam_jax import experiment, train
  from fusionsam_jax import training as T
  from fusionsam_jax import workdir as W
  from fusionsam_jax.cli_common import EXIT_NONFINITE
  config = tiny_config(tmp_path / "data")
  work = str(tmp_path / "work")
  os.makedirs(work)
  W.check_config(work, config)                 # what the first run stored

  def diverges(*a, **k):
    raise T.NonFiniteLossError(7, "loss", float("nan"), last_good_checkpoint=4)
  monkeypatch.setattr(experiment, "train", diverges)
  assert train.run(config, work, progress=False) == EXIT_NONFINITE
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert "--allow_config_change" in line and "--config.train.stages.<" in line, line
  # what the advice says to do ...
  stage = line.split("--config.train.stages.<")[1].split(">")[0].split("|")[0]
  lowered = tiny_config(tmp_path / "data")
  lowered.train.stages[stage].lr = float(config.train.stages[stage].lr) / 10
  # ... is refused without the flag (exit 4: the old advice) and accepted with it
  with pytest.raises(T.ConfigMismatchError, match=f"train.stages.{stage}.lr"):
    W.check_config(work, lowered)
  W.check_config(work, lowered, allow_change=True)
