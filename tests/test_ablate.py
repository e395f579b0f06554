"""fusionsam_jax.ablate (Fig. 7b): variants compose like the config files' own variant
argument; one real CLI run on configs/demo.py:tiny whose JSON / table agree with each
variant's own evaluation; a second run retrains nothing."""

import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from _cli_helpers import DEMO_TINY, run_module, tiny_config, tiny_overrides


def _iou_from_matrix(matrix):
  """Per-class IoU from a confusion matrix, written out with explicit loops (nan where a
  class is neither predicted nor present)."""
  m = np.asarray(matrix, np.int64)
  out = []
  for c in range(m.shape[0]):
    tp = m[c, c]
    fn = sum(m[c, j] for j in range(m.shape[0]) if j != c)
    fp = sum(m[i, c] for i in range(m.shape[0]) if i != c)
    out.append(np.nan if tp + fn + fp == 0 else tp / (tp + fn + fp))
  return np.asarray(out)


def test_variants_compose_like_the_config_argument(tmp_path):
  from fusionsam_jax import ablation as ablate
  from fusionsam_jax.training.guards import config_to_dict
  base = tiny_config(tmp_path, "tiny")
  assert ablate.variant_names(base) == ["full", "ablation_a", "ablation_b", "rgb_only",
                                        "thermal_only"]
  for name in ("ablation_a", "ablation_b", "rgb_only", "thermal_only"):
    mine = ablate.variant_config(base, name)
    theirs = tiny_config(tmp_path, f"tiny,{name}")   # configs/demo.py:tiny,<name>
    assert config_to_dict(mine) == config_to_dict(theirs), name
  assert config_to_dict(ablate.variant_config(base, "full")) == config_to_dict(base)
  assert base.model.modalities == ("rgb", "thermal")   # the base is not changed
  vdt = config_lib_load("vdt").get_config("tiny")
  assert ablate.variant_names(vdt)[-3:] == ["rgb_only", "depth_only", "thermal_only"]
  with pytest.raises(ValueError, match="depth"):
    ablate.variant_config(base, "depth_only")


def config_lib_load(name):
  import importlib.util
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(f"cfg_{name}",
                                                os.path.join(root, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _check_study(root, names):
  rec = json.load(open(root / "ablation.json"))
  assert list(rec["variants"]) == names
  assert rec["split"] == "test" and len(rec["class_names"]) == 9
  for k in ("jax", "flax", "cpu_count", "devices", "python"):
    assert k in rec["environment"], k
  assert "fusionsam_jax.ablate" in rec["command"]
  md = open(root / "ablation.md").read()
  for n in names:
    v = rec["variants"][n]
    # Independent truth: the variant's own evaluation JSON in its workdir, IoU recomputed
    # from its confusion matrix.
    own = json.load(open(root / n / "eval_test_best.json"))
    assert v["eval_json"] == str(root / n / "eval_test_best.json")
    iou = _iou_from_matrix(own["confusion_matrix"])
    got = np.asarray([np.nan if v["iou"][c] is None else v["iou"][c]
                      for c in rec["class_names"]])
    np.testing.assert_allclose(got, iou, atol=1e-12, equal_nan=True)
    assert v["miou"] == pytest.approx(float(np.nanmean(iou)), abs=1e-12)
    assert v["num_images"] == own["num_images"] == 4
    assert v["wall_seconds"] > 0 and set(v["stages"]) == {"tokenizer", "fusion",
                                                           "segmentation"}
    assert f"| {v['label']} |" in md and f"{v['miou'] * 100:.1f}" in md
  with Image.open(root / "ablation.png") as im:
    assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
  return rec


def test_ablate_cli_tiny_and_resume(tmp_path):
  data, root = tmp_path / "data", tmp_path / "study"
  names = ["rgb_only"]     # one variant (each trains 3 stages); all five: the extended test
  args = [f"--config={DEMO_TINY}", f"--workdir_root={root}", f"--variants={','.join(names)}",
          *tiny_overrides(data)]
  r = run_module("fusionsam_jax.ablate", *args)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
  assert "Ablation (Fig. 7b)" in r.stdout and "RGB only" in r.stdout
  assert sorted(os.listdir(root)) == ["ablation.json", "ablation.md", "ablation.png",
                                      "rgb_only"]
  first = _check_study(root, names)
  assert json.load(open(root / "rgb_only" / "config.json"))["config"]["model"]["modalities"] == ["rgb"]
  # Again: nothing is retrained, the records are the first run's.
  t0 = time.perf_counter()
  r = run_module("fusionsam_jax.ablate", *args)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.count("not retrained") == 1 and "== stage" not in r.stdout
  second = _check_study(root, names)
  for n in names:
    for k in ("iou", "miou", "wall_seconds", "step"):
      assert second["variants"][n][k] == first["variants"][n][k]
  assert time.perf_counter() - t0 < 60
  # A usage error names the flag.
  r = run_module("fusionsam_jax.ablate", f"--config={DEMO_TINY}", f"--workdir_root={root}",
                 "--variants=full,nolstg")
  assert r.returncode == 2 and "--variants nolstg" in r.stderr


@pytest.mark.extended   # the mechanism: test_ablate_cli_tiny_and_resume (one variant)
def test_ablate_cli_tiny_all_variants(tmp_path):
  root = tmp_path / "study"
  r = run_module("fusionsam_jax.ablate", f"--config={DEMO_TINY}", f"--workdir_root={root}",
                 *tiny_overrides(tmp_path / "data"))
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
  _check_study(root, ["full", "ablation_a", "ablation_b", "rgb_only", "thermal_only"])
