"""mIoU and SOD metrics against independent references (scikit-learn, PySODMetrics)."""

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusionsam_jax.metrics import miou as miou_mod
from fusionsam_jax.metrics import sod as sod_mod
from fusionsam_jax.cli import miou as miou_cli
from fusionsam_jax.cli import sod as sod_cli
from fusionsam_jax.metrics.miou import ConfusionMatrix, confusion_matrix, format_iou_table
from fusionsam_jax.metrics.sod import SODMetrics

GOLDEN = Path(__file__).parent / "fixtures" / "sod_golden"
REPO = Path(__file__).resolve().parents[1]
MFNET_NAMES = ["Unlabeled", "Car", "Person", "Bike", "Curve", "Car Stop", "Guardrail",
               "Color Cone", "Bump"]


# ============================================================================ mIoU


def _random_batch(rng, c, shape, ignore_frac=0.1):
  label = rng.integers(0, c, shape)
  # correlated prediction: right 60 % of the time
  pred = np.where(rng.random(shape) < 0.6, label, rng.integers(0, c, shape))
  label = np.where(rng.random(shape) < ignore_frac, 255, label)
  return pred, label


def _sk_cm(preds, labels, valids, c):
  from sklearn.metrics import confusion_matrix as sk_cm

  t, p = [], []
  for pr, la, va in zip(preds, labels, valids):
    keep = (la != 255) & va
    t.append(la[keep])
    p.append(pr[keep])
  return sk_cm(np.concatenate(t), np.concatenate(p), labels=list(range(c)))


def test_accumulator_and_jax_match_sklearn():
  import jax

  rng = np.random.default_rng(0)
  c = 6
  shapes = [(37, 53), (2, 20, 31), (64, 48)]
  preds, labels, valids = [], [], []
  acc_np = ConfusionMatrix(c)
  acc_jax = ConfusionMatrix(c)
  jit_cm = jax.jit(confusion_matrix, static_argnames=("num_classes", "ignore_index"))
  for i, shp in enumerate(shapes):
    pred, label = _random_batch(rng, c, shp)
    valid = rng.random(shp) < 0.9 if i == 1 else np.ones(shp, bool)
    preds.append(pred)
    labels.append(label)
    valids.append(valid)
    acc_np.update(pred, label, valid=valid if i == 1 else None)
    m = jit_cm(pred.astype(np.int32), label.astype(np.int32), num_classes=c,
               valid=valid if i == 1 else None)
    assert m.dtype == np.int32 and m.shape == (c, c)
    acc_jax.add(np.asarray(m))
  ref = _sk_cm(preds, labels, valids, c)
  np.testing.assert_array_equal(acc_np.matrix, ref)
  np.testing.assert_array_equal(acc_jax.matrix, ref)
  assert acc_np.matrix.dtype == np.int64
  # IoU / accuracy from the sklearn matrix by formula
  tp = np.diag(ref)
  np.testing.assert_allclose(acc_np.iou(), tp / (ref.sum(0) + ref.sum(1) - tp))
  assert acc_np.pixel_accuracy() == pytest.approx(tp.sum() / ref.sum())


def test_jax_confusion_matrix_full_resolution_and_out_of_range():
  import jax

  rng = np.random.default_rng(1)
  pred, label = _random_batch(rng, 9, (2, 480, 640))
  pred[0, 0, :5] = 9  # out of range predictions are not counted by the JAX version
  m = np.asarray(jax.jit(confusion_matrix, static_argnums=2)(pred, label, 9))
  keep = (label != 255) & (pred < 9)
  ref = np.bincount(label[keep] * 9 + pred[keep], minlength=81).reshape(9, 9)
  np.testing.assert_array_equal(m, ref)
  # the numpy accumulator refuses them instead
  with pytest.raises(ValueError, match="prediction holds values \\[9\\]"):
    ConfusionMatrix(9).update(pred, label)


def test_hand_computed_3x3():
  label = np.array([[0, 0, 1], [1, 2, 2], [255, 0, 1]])
  pred = np.array([[0, 1, 1], [1, 2, 0], [2, 0, 2]])
  cm = ConfusionMatrix(3)
  cm.update(pred, label)
  np.testing.assert_array_equal(cm.matrix, [[2, 1, 0], [0, 2, 1], [1, 0, 1]])
  np.testing.assert_allclose(cm.iou(), [0.5, 0.5, 1 / 3])
  assert cm.miou() == pytest.approx(4 / 9)
  assert cm.pixel_accuracy() == pytest.approx(5 / 8)
  np.testing.assert_allclose(cm.class_accuracy(), [2 / 3, 2 / 3, 1 / 2])


def test_absent_classes_are_nan_and_skipped():
  cm = ConfusionMatrix(5)
  label = np.array([[0, 0, 1, 1]])
  pred = np.array([[0, 3, 1, 1]])  # class 3 only predicted: IoU 0; classes 2, 4 absent
  cm.update(pred, label)
  iou = cm.iou()
  assert iou[0] == pytest.approx(0.5) and iou[1] == 1.0 and iou[3] == 0.0
  assert math.isnan(iou[2]) and math.isnan(iou[4])
  assert cm.miou() == pytest.approx((0.5 + 1.0 + 0.0) / 3)
  s = cm.summary()
  assert s["iou"]["2"] is None and s["iou"]["3"] == 0.0
  empty = ConfusionMatrix(3)
  assert math.isnan(empty.miou()) and math.isnan(empty.pixel_accuracy())


def test_accumulator_input_errors():
  cm = ConfusionMatrix(3, ignore_index=255)
  with pytest.raises(ValueError, match="label holds values \\[3\\]"):
    cm.update(np.zeros((2, 2), int), np.full((2, 2), 3))
  with pytest.raises(ValueError, match="shape"):
    cm.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
  with pytest.raises(ValueError, match="integer"):
    cm.update(np.zeros((2, 2)), np.zeros((2, 2), int))
# a custom ignore index
  cm2 = ConfusionMatrix(3, ignore_index=-1)
  cm2.update(np.array([0, 1, 2]), np.array([0, -1, 2]))
  assert cm2.matrix.sum() == 2


def test_table_layout():
  iou = np.array([0.987, 0.896, 0.762, 0.758, 0.696, 0.501, 0.102, 0.476, np.nan])
  t = format_iou_table(iou, MFNET_NAMES)
  header, row = t.splitlines()
  assert header.split()[0] == "Method" and header.endswith("mIoU(%)")
  assert "Car Stop" in header and "Color Cone" in header
  cells = row.split()
  assert cells[0] == "Ours" and cells[1] == "98.7" and cells[-2] == "-"
  assert cells[-1] == f"{np.nanmean(iou) * 100:.1f}"
  # Table 2 style: only some columns shown, mIoU over every class
  sub = format_iou_table(iou, MFNET_NAMES, columns=["Car", "Person"], method="X")
  assert sub.splitlines()[1].split() == ["X", "89.6", "76.2", f"{np.nanmean(iou) * 100:.1f}"]
  md = format_iou_table({"A": iou, "B": iou}, MFNET_NAMES, markdown=True)
  assert md.count("\n") == 3 and md.startswith("| Method |")
  with pytest.raises(ValueError):
    format_iou_table(iou, MFNET_NAMES[:3])


# ---------------------------------------------------------------------------- mIoU CLI


def _save(path, arr, mode="L"):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.asarray(arr, np.uint8), mode=mode).save(path)


@pytest.fixture
def label_dirs(tmp_path):
  rng = np.random.default_rng(2)
  preds, labels = [], []
  for i, shp in enumerate([(30, 40), (25, 35), (30, 40)]):
    p, la = _random_batch(rng, 4, shp)
    _save(tmp_path / "pred" / f"{i:05d}.png", p)
    _save(tmp_path / "gt" / f"{i:05d}.png", la)
    preds.append(p)
    labels.append(la)
  return tmp_path, preds, labels


def test_miou_cli(label_dirs, capsys):
  root, preds, labels = label_dirs
  out = root / "res" / "miou.json"
  rc = miou_cli.main(["--pred_dir", str(root / "pred"), "--gt_dir", str(root / "gt"),
                      "--num_classes", "4", "--json", str(out),
                      "--class_names", "bg,car,person,bike"])
  assert rc == 0
  ref = _sk_cm(preds, labels, [np.ones_like(p, bool) for p in preds], 4)
  res = json.loads(out.read_text())
  np.testing.assert_array_equal(res["confusion_matrix"], ref)
  tp = np.diag(ref)
  iou = tp / (ref.sum(0) + ref.sum(1) - tp)
  assert list(res["iou"]) == ["bg", "car", "person", "bike"]
  np.testing.assert_allclose(list(res["iou"].values()), iou)
  assert res["miou"] == pytest.approx(iou.mean())
  assert res["num_images"] == 3
  printed = capsys.readouterr().out
  assert "mIoU(%)" in printed and "person" in printed
  assert not [f for f in os.listdir(out.parent) if f.startswith(".tmp-")]


def test_miou_cli_errors(label_dirs, capsys):
  root, _, _ = label_dirs
  args = ["--pred_dir", str(root / "pred"), "--gt_dir", str(root / "gt"), "--num_classes", "4"]
  # size mismatch: a prediction is not resized, the file is named
  _save(root / "pred" / "00001.png", np.zeros((26, 35)))
  assert miou_cli.main(args) != 0
  assert "00001.png" in capsys.readouterr().err
  # missing prediction
  os.remove(root / "pred" / "00001.png")
  assert miou_cli.main(args) != 0
  assert "00001.png" in capsys.readouterr().err
  # extra prediction
  _save(root / "pred" / "00001.png", np.zeros((25, 35)))
  _save(root / "pred" / "extra.png", np.zeros((25, 35)))
  assert miou_cli.main(args) != 0
  assert "extra.png" in capsys.readouterr().err
  os.remove(root / "pred" / "extra.png")
  # label value beyond num_classes
  assert miou_cli.main(args[:-1] + ["3"]) != 0
  assert "wrong num_classes" in capsys.readouterr().err
  # colour label images are refused
  _save(root / "gt" / "00002.png", np.zeros((30, 40, 3)), mode="RGB")
  assert miou_cli.main(args) != 0
  assert "00002.png" in capsys.readouterr().err


def test_miou_cli_subprocess(label_dirs):
  root, _, _ = label_dirs
  base = [sys.executable, "-m", "fusionsam_jax.metrics.miou", "--pred_dir", str(root / "pred"),
          "--gt_dir", str(root / "gt")]
  ok = subprocess.run(base + ["--num_classes", "4"], cwd=REPO, capture_output=True, text=True)
  assert ok.returncode == 0, ok.stderr
  os.remove(root / "pred" / "00002.png")
  bad = subprocess.run(base + ["--num_classes", "4"], cwd=REPO, capture_output=True, text=True)
  assert bad.returncode != 0 and "00002.png" in bad.stderr


# ============================================================================ SOD


def _pysod_results(pairs):
  """Reference numbers from PySODMetrics (classic classes and FmeasureV2)."""
  import py_sod_metrics as M

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    sm, mae, em, fm = M.Smeasure(), M.MAE(), M.Emeasure(), M.Fmeasure()
    fm2 = M.FmeasureV2(metric_handlers={
        "fm": M.FmeasureHandler(with_dynamic=True, with_adaptive=True, beta=0.3)})
    for p, g in pairs:
      for m in (sm, mae, em, fm, fm2):
        m.step(pred=p, gt=g)
    e = em.get_results()["em"]
    f = fm.get_results()
    f2 = fm2.get_results()["fm"]
  ref = {"Sm": sm.get_results()["sm"], "MAE": mae.get_results()["mae"],
         "adpEm": e["adp"], "meanEm": e["curve"].mean(), "maxEm": e["curve"].max(),
         "adpFm": f["fm"]["adp"], "meanFm": f["fm"]["curve"].mean(),
         "maxFm": f["fm"]["curve"].max()}
  curves = {"em": e["curve"], "fm": f["fm"]["curve"], "precision": f["pr"]["p"],
            "recall": f["pr"]["r"], "fm_v2": f2["dynamic"], "adpFm_v2": f2["adaptive"]}
  return ref, curves


def _compare(pairs, tol=1e-6):
  acc = SODMetrics()
  for p, g in pairs:
    acc.update(p, g)
  res = acc.results()
  ref, curves = _pysod_results(pairs)
  for k in sod_mod.RESULT_KEYS:
    assert res[k] == pytest.approx(ref[k], abs=tol, rel=0), k
# our curves are indexed by ascending threshold, PySODMetrics' descending
  for k in ("em", "fm", "precision", "recall"):
    np.testing.assert_allclose(res["curves"][k][::-1], curves[k], atol=tol, rtol=0)
  np.testing.assert_allclose(res["curves"]["fm"][::-1], curves["fm_v2"], atol=tol, rtol=0)
  assert res["adpFm"] == pytest.approx(curves["adpFm_v2"], abs=tol)
  return res


def _golden_pairs():
  names = sorted(os.listdir(GOLDEN / "preds"))
  return names, [(sod_mod.load_grey_png(GOLDEN / "preds" / n),
                  sod_mod.load_grey_png(GOLDEN / "masks" / n)) for n in names]


def test_sod_golden_matches_pysodmetrics():
  names, pairs = _golden_pairs()
  assert len(names) == 3
  # the fixtures include an all-background (RGB) mask and a mask with grey levels
  assert any(not (g > 128).any() for _, g in pairs)
  assert any(len(np.unique(g)) > 2 for _, g in pairs)
  _compare(pairs)
  for pair in pairs:  # and image by image
    _compare([pair])


def _blob(rng, h, w):
  yy, xx = np.mgrid[:h, :w]
  cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
  r = rng.uniform(0.1, 0.35) * min(h, w)
  return np.hypot(yy - cy, xx - cx) / r


def test_sod_random_matches_pysodmetrics():
  rng = np.random.default_rng(3)
  pairs = []
  for h, w in [(48, 64), (33, 27), (80, 50), (17, 91)]:
    d = _blob(rng, h, w)
    gt = np.where(d < 1, 255, 0).astype(np.uint8)
    soft = np.clip(255 * (1.4 - d) + rng.normal(0, 40, d.shape), 0, 255).astype(np.uint8)
    pairs.append((soft, gt))
    pairs.append((rng.integers(0, 256, (h, w), dtype=np.uint8), gt))
    # GT with grey levels around the 128 cut
    pairs.append((soft, rng.choice(np.array([0, 127, 128, 129, 255], np.uint8), (h, w))))
  pairs.append((rng.integers(30, 200, (40, 40), dtype=np.uint8), np.zeros((40, 40), np.uint8)))
  pairs.append((rng.integers(0, 256, (40, 40), dtype=np.uint8),
                np.full((40, 40), 255, np.uint8)))
  pairs.append((np.full((40, 40), 77, np.uint8), pairs[0][1][:40, :40]))  # constant pred
  pairs.append((np.zeros((40, 40), np.uint8), pairs[0][1][:40, :40]))     # all-zero pred
  _compare(pairs)
  for pair in pairs:
    _compare([pair])


def test_sod_normalized_input_and_corner_case():
  rng = np.random.default_rng(4)
  pred = rng.random((20, 30))
  gt = rng.random((20, 30)) > 0.7
  a, b = SODMetrics(), SODMetrics()
  a.update(pred, gt, normalize=False)
  b.update(pred.astype(np.float32), gt, normalize=False)
  assert a.results()["Sm"] == pytest.approx(b.results()["Sm"], abs=1e-6)
  with pytest.raises(ValueError):
    a.update(pred * 2, gt, normalize=False)
  with pytest.raises(ValueError):
    a.update(pred, gt.astype(np.uint8), normalize=False)
# foreground only in the last column: an empty S-measure block (PySODMetrics gives nan)
  g = np.zeros((10, 10), bool)
  g[:, -1] = True
  assert np.isfinite(sod_mod.s_measure(pred[:10, :10], g))


def test_sod_cli(tmp_path, capsys):
  out = tmp_path / "sod.json"
  args = ["--pred_dir", str(GOLDEN / "preds"), "--gt_dir", str(GOLDEN / "masks")]
  assert sod_cli.main(args + ["--json", str(out)]) == 0
  res = json.loads(out.read_text())
  ref, _ = _pysod_results(_golden_pairs()[1])
  for k in sod_mod.RESULT_KEYS:
    assert res[k] == pytest.approx(ref[k], abs=1e-6), k
  assert res["num_images"] == 3
  assert "maxFm" in capsys.readouterr().out
  # size mismatch names the file; exit code non-zero
  (tmp_path / "p").mkdir()
  (tmp_path / "g").mkdir()
  _save(tmp_path / "p" / "a.png", np.zeros((10, 12)))
  _save(tmp_path / "g" / "a.png", np.zeros((12, 10)))
  assert sod_cli.main(["--pred_dir", str(tmp_path / "p"), "--gt_dir", str(tmp_path / "g")]) != 0
  assert "a.png" in capsys.readouterr().err


def test_sod_cli_subprocess(tmp_path):
  r = subprocess.run([sys.executable, "-m", "fusionsam_jax.metrics.sod",
                      "--pred_dir", str(GOLDEN / "preds"), "--gt_dir", str(GOLDEN / "masks"),
                      "--json", str(tmp_path / "x.json"), "--curves"],
                     cwd=REPO, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  res = json.loads((tmp_path / "x.json").read_text())
  assert len(res["curves"]["fm"]) == 256


def _palette_png(path, idx, colours):
  """A palette PNG: indices `idx`, palette entry i = colours[i]."""
  im = Image.fromarray(np.asarray(idx, np.uint8), "P")
  im.putpalette([v for c in colours for v in c])
  im.save(path)


def test_palette_pngs_are_read_as_class_ids_or_refused(tmp_path, capsys):
  """Issue 17, defect 10: palette PNGs whose indices are not class ids (a colour mask saved
  by `quantize`, indices by frequency) were counted as ids: 5.7 % for 65.7 %."""
  from fusionsam_jax.data.datasets.mfnet import SPEC as MFNET
  pal = [tuple(c) for c in MFNET.palette]
  rng = np.random.default_rng(0)
  gt = rng.integers(0, 9, (12, 16))
  pred = np.where(rng.random((12, 16)) < 0.7, gt, rng.integers(0, 9, (12, 16)))
  ref = ConfusionMatrix(9)
  ref.update(pred, gt)
  (tmp_path / "gt").mkdir()
  (tmp_path / "p").mkdir()
  _save(tmp_path / "gt" / "a.png", gt)
  # the prediction as a colour mask saved as a palette PNG with its own index order
  perm = rng.permutation(9)                   # class k is stored as index perm[k]
  colours = [None] * 9
  for k in range(9):
    colours[perm[k]] = pal[k]
  _palette_png(tmp_path / "p" / "a.png", perm[pred], colours)
  args = ["--pred_dir", str(tmp_path / "p"), "--gt_dir", str(tmp_path / "gt"),
          "--num_classes", "9", "--json", str(tmp_path / "r.json")]
  # without the dataset palette: refused, the file named
  assert miou_cli.main(args) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "p/a.png" in err[0] and "palette" in err[0], err
  # with it, the colours are mapped to their class ids: the true confusion matrix
  assert miou_cli.main(args + ["--dataset", "mfnet"]) == 0
  assert json.loads((tmp_path / "r.json").read_text())["confusion_matrix"] == ref.matrix.tolist()
  # a palette that is the dataset's own (index i = class i) or a grey ramp: indices are ids
  _palette_png(tmp_path / "p" / "a.png", pred, pal)
  assert miou_cli.main(args + ["--dataset", "mfnet"]) == 0
  assert json.loads((tmp_path / "r.json").read_text())["confusion_matrix"] == ref.matrix.tolist()
  _palette_png(tmp_path / "p" / "a.png", pred, [(i, i, i) for i in range(9)])
  assert miou_cli.main(args) == 0
  assert json.loads((tmp_path / "r.json").read_text())["confusion_matrix"] == ref.matrix.tolist()
  # --palette_indices: counted as they are
  _palette_png(tmp_path / "p" / "a.png", perm[pred], colours)
  assert miou_cli.main(args + ["--palette_indices"]) == 0
  capsys.readouterr()
  bad = ConfusionMatrix(9)
  bad.update(perm[pred], gt)
  assert json.loads((tmp_path / "r.json").read_text())["confusion_matrix"] == bad.matrix.tolist()


def test_bad_ground_truth_value_names_the_ground_truth(label_dirs, capsys):
  """Issue 17, defect 11: a bad ground-truth value was blamed on the prediction file."""
  root, _, labels = label_dirs
  gt = labels[0].copy()
  gt[0, 0] = 7
  name = sorted(os.listdir(root / "gt"))[0]
  _save(root / "gt" / name, gt)
  assert miou_cli.main(["--pred_dir", str(root / "pred"), "--gt_dir", str(root / "gt"),
                        "--num_classes", "4"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and str(root / "gt" / name) in err[0], err
  assert "ground truth holds values [7]" in err[0] and str(root / "pred") not in err[0]


def test_bad_split_list_is_one_line_naming_it(label_dirs, capsys):
  """A non-UTF-8 --split_list was a bare codec error; a '../' entry read outside --gt_dir."""
  root, _, _ = label_dirs
  args = ["--pred_dir", str(root / "pred"), "--gt_dir", str(root / "gt"), "--num_classes", "4"]
  lst = root / "list.txt"
  for content, needle in ((b"00000\n\xff\n", "not UTF-8"), (b"../pred/00000\n", "out of")):
    lst.write_bytes(content)
    assert miou_cli.main(args + ["--split_list", str(lst)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(lst) in err[0] and needle in err[0], err


def test_a_killed_writers_temporary_png_is_not_a_prediction(tmp_path):
  """Issue 37 item 11: a SIGKILLed predict left labels/.tmp-*.png, which metrics.miou then
  refused ("prediction has no ground truth"); predict now removes those of dead processes."""
  from PIL import Image

  from fusionsam_jax import fsutil
  from fusionsam_jax.metrics.miou import evaluate_label_dirs
  pred, gt = tmp_path / "pred", tmp_path / "gt"
  pred.mkdir()
  gt.mkdir()
  lab = np.array([[0, 1], [1, 2]], np.uint8)
  for d in (pred, gt):
    Image.fromarray(lab).save(d / "a.png")
  Image.fromarray(lab).save(pred / ".tmp-999999-abcdefgh.png")
  cm = evaluate_label_dirs(pred, gt, 3)
  assert cm.num_updates == 1 and cm.miou() == 1.0
  assert fsutil.clean_orphans(pred, [fsutil.TEMP_FILE_PREFIX]) == [
      str(pred / ".tmp-999999-abcdefgh.png")]
