"""The evaluation report and the paper-column tables, against independent references:
scikit-learn for the matrix, mAcc and IoU, headless Chromium for the HTML (every image
must decode), the paper's own mIoU for its rows."""

import html
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from fusionsam_jax.data.datasets.fmb import SPEC as FMB
from fusionsam_jax.data.datasets.mfnet import SPEC as MFNET
from fusionsam_jax.metrics.miou import ConfusionMatrix, format_paper_table

PAPER_TABLES = {s.name: s.paper for s in (MFNET, FMB)}
C = 9


def _labels(seed=0, n=3, shape=(24, 32), c=C, drop_class=None):
  rng = np.random.default_rng(seed)
  labels, preds = [], []
  for _ in range(n):
    lab = rng.integers(0, c, shape)
    if drop_class is not None:
      lab[lab == drop_class] = 0
    pred = np.where(rng.random(shape) < 0.7, lab, rng.integers(0, c, shape))
    lab = np.where(rng.random(shape) < 0.05, 255, lab)
    labels.append(lab)
    preds.append(pred)
  return labels, preds


def _result(labels, preds, names, **extra):
  cm = ConfusionMatrix(len(names))
  for lab, pred in zip(labels, preds):
    cm.update(pred, lab)
  r = cm.summary(names)
  r.update(extra)
  return r


def _flat(labels, preds):
  t = np.concatenate([x.ravel() for x in labels])
  p = np.concatenate([x.ravel() for x in preds])
  keep = t != 255
  return t[keep], p[keep]


def test_macc_iou_and_row_normalisation_match_sklearn():
  from sklearn.metrics import balanced_accuracy_score, confusion_matrix, jaccard_score
  from fusionsam_jax.evaluators.report import row_normalised
  labels, preds = _labels(drop_class=4)          # class 4 absent from the truth
  t, p = _flat(labels, preds)
  r = _result(labels, preds, list(MFNET.class_names))
  cm = ConfusionMatrix.from_matrix(r["confusion_matrix"])
  np.testing.assert_array_equal(cm.matrix, confusion_matrix(t, p, labels=range(C)))
  with pytest.warns(UserWarning):                # sklearn: class 4 predicted, never true
    ref_macc = balanced_accuracy_score(t, p)
  assert cm.mean_class_accuracy() == pytest.approx(ref_macc, abs=1e-12)
  assert r["mean_class_accuracy"] == pytest.approx(ref_macc, abs=1e-12)
  # class 4 is predicted somewhere, so its IoU is 0 (not nan) in both
  np.testing.assert_allclose(cm.iou(), jaccard_score(t, p, labels=range(C), average=None))
  ref_norm = np.nan_to_num(confusion_matrix(t, p, labels=range(C), normalize="true"))
  np.testing.assert_allclose(row_normalised(r["confusion_matrix"]), ref_norm, atol=1e-12)


def test_paper_tables_columns_and_numbers():
  from sklearn.metrics import balanced_accuracy_score, jaccard_score
  # The paper's mIoU of MFNet's Table 1 is the mean of its nine printed classes.
  mf = PAPER_TABLES["mfnet"]
  assert round(sum(mf.iou) / len(mf.iou), 1) == mf.miou == 64.4
  assert [h for _, h in mf.columns] == ["Unlabeled", "Car", "Person", "Bike", "Curve",
                                        "Car Stop", "Guardrail", "Color Cone", "Bump"]
  for t in PAPER_TABLES.values():
    names = {"mfnet": MFNET, "fmb": FMB}[t.dataset].class_names
    assert all(c in names for c, _ in t.columns)

  names = list(FMB.class_names)
  labels, preds = _labels(seed=1, c=len(names))
  t, p = _flat(labels, preds)
  r = _result(labels, preds, names, dataset="fmb", split="test", generated=False)
  md = format_paper_table(r, markdown=True).splitlines()
  assert md[0] == ("| Method | Car | Person | Truck | T-Lamp | T-Sign | Building | Vegetation "
                   "| Pole | mIoU(%) | mAcc(%) | PixAcc(%) |")
  ours = [c.strip() for c in md[2].strip("|").split("|")]
  iou = jaccard_score(t, p, labels=range(len(names)), average=None)
  cols = ["car", "person", "truck", "lamp", "sign", "building", "vegetation", "pole"]
  assert ours[1:9] == [f"{iou[names.index(c)] * 100:.1f}" for c in cols]
  assert ours[9] == f"{iou.mean() * 100:.1f}"             # mIoU over all 15 classes
  assert ours[10] == f"{balanced_accuracy_score(t, p) * 100:.1f}"
  assert ours[11] == f"{(t == p).mean() * 100:.1f}"
  paper = [c.strip() for c in md[3].strip("|").split("|")]
  assert paper[0] == "FusionSAM (paper, Table 2)"
  assert paper[1:10] == ["80.4", "59.4", "48.2", "47.3", "52.1", "85.7", "87.8", "52.0", "64.1"]
  # every class with all_classes; no paper row for generated scenes or another split
  full = format_paper_table(r, all_classes=True, markdown=True).splitlines()[0]
  assert all(f" {n} " in full for n in names)
  assert len(format_paper_table(dict(r, generated=True), markdown=True).splitlines()) == 3
  assert len(format_paper_table(dict(r, split="val"), markdown=True).splitlines()) == 3


def _chromium():
  for name in ("chromium", "chromium-browser", "google-chrome"):
    if shutil.which(name):
      return shutil.which(name)
  return None


_CHECK = """<script>
window.addEventListener('load', function () {
  var r = Array.prototype.map.call(document.images, function (i) {
    return {id: i.id, ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth,
            h: i.naturalHeight, src: i.src.slice(0, 22)};
  });
  var pre = document.createElement('pre');
  pre.id = 'img-check';
  pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});
</script>"""


def _run_chromium(binary, tmp_path, *args):
  profile = tmp_path / "profile"
  cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=10000",
         *args]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _samples(labels, preds):
  rng = np.random.default_rng(3)
  out = []
  for i, (lab, pred) in enumerate(zip(labels, preds)):
    h, w = lab.shape
    out.append(dict(name=f"{i:05d}D",
                    modalities={"rgb": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                                "thermal": rng.integers(0, 256, (h, w, 1), dtype=np.uint8)},
                    fused=rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                    label=lab, pred=pred))
  return out


def _jsonl(path):
  rows = []
  for stage, base in (("tokenizer", 2.0), ("fusion", 16.0), ("segmentation", 3.0)):
    for step in range(2, 21, 2):
      rows.append({"step": step, "time": 0.0, "split": f"{stage}/train",
                   "loss": base / step, "lr": 1e-3})
    if stage == "segmentation":
      rows += [{"step": s, "time": 0.0, "split": "segmentation/val", "val_miou": 0.1 * s / 4}
               for s in (4, 8, 12)]
  with open(path, "w") as f:
    f.write("\n".join(json.dumps(r) for r in rows) + "\n{\"step\": 3")   # torn last line
  return rows


def test_report_html_renders_in_chromium(tmp_path):
  from fusionsam_jax.evaluators.report import read_curves, write_report
  binary = _chromium()
  if binary is None:
    pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium; .ci/run "
                "installs it)")
  labels, preds = _labels(seed=2, n=3, shape=(48, 64))
  r = _result(labels, preds, list(MFNET.class_names), dataset="mfnet", split="test",
              generated=False, checkpoint="best", step=20, num_images=3,
              modalities=["rgb", "thermal"])
  rows = _jsonl(tmp_path / "metrics.jsonl")
  curves = read_curves(tmp_path / "metrics.jsonl")
  assert [v for _, v in curves["fusion"]["loss"]] == [r_["loss"] for r_ in rows
                                                       if r_["split"] == "fusion/train"]
  assert curves["segmentation"]["val_miou"] == [(4, 0.1), (8, 0.2), (12, pytest.approx(0.3))]
  out = tmp_path / "report"
  paths = write_report(out, result=r, metrics_jsonl=tmp_path / "metrics.jsonl",
                       samples=_samples(labels, preds), palette=MFNET.palette)
  assert set(paths) == {"confusion_matrix", "iou", "samples", "curves", "report"}
  for k, p in paths.items():
    if k != "report":
      with Image.open(p) as im:
        assert im.format == "PNG" and min(im.size) > 100, (k, im.size)

  text = open(paths["report"]).read()
  srcs = re.findall(r"<img[^>]*\ssrc='([^']*)'", text)
  assert len(srcs) == 4 and all(s.startswith("data:image/png;base64,") for s in srcs)
  assert "FusionSAM (paper, Table 1)" in text and "mAcc(%)" in text
  assert "Color Cone" in text and "64.4" in text

  # Chromium: load a copy with a script that records whether each <img> decoded.
  probe = tmp_path / "probe.html"
  probe.write_text(text.replace("</body>", _CHECK + "</body>"))
  r1 = _run_chromium(binary, tmp_path, "--dump-dom", probe.as_uri())
  m = re.search(r'<pre id="img-check">(.*?)</pre>', r1.stdout, re.S)
  assert m, (r1.returncode, r1.stdout[-2000:], r1.stderr[-2000:])
  imgs = json.loads(html.unescape(m.group(1)))
  assert sorted(i["id"] for i in imgs) == ["confusion_matrix", "curves", "iou", "samples"]
  assert all(i["ok"] and i["w"] > 100 and i["h"] > 100 for i in imgs), imgs
  for i in imgs:     # decoded at the PNG's own size
    with Image.open(paths[i["id"]]) as im:
      assert (i["w"], i["h"]) == im.size

  shot = tmp_path / "report.png"
  r2 = _run_chromium(binary, tmp_path, f"--screenshot={shot}", "--window-size=1280,2400",
                     "--hide-scrollbars", (out / "report.html").as_uri())
  assert shot.exists(), r2.stderr[-2000:]
  with Image.open(shot) as im:
    a = np.asarray(im.convert("RGB"))
  assert a.shape[:2] == (2400, 1280)
  assert len(np.unique(a.reshape(-1, 3), axis=0)) > 50      # the figures, not a blank page
