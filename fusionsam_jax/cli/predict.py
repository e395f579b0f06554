r"""Segment new images with a trained FusionSAM run; writes PNGs.

    # one sample: one file per modality of the run (rgb, thermal [, depth])
    python -m fusionsam_jax.predict --workdir runs/mfnet --rgb a.png --thermal a_t.png --out out/
    # several: repeat the flags; files are paired by NAME (x.png with x.png), never by order
    python -m fusionsam_jax.predict --workdir runs/mfnet --rgb rgb/a.png --rgb rgb/b.png \
        --thermal ir/a.png --thermal ir/b.png --out out/
    # one folder per modality, paired by file name
    python -m fusionsam_jax.predict --workdir runs/mfnet --rgb_dir rgb/ --thermal_dir ir/ --out out/
    # whole samples in one file each: MFNet 4-channel PNGs (RGB + thermal), or the images of
    # a one-modality run
    python -m fusionsam_jax.predict --workdir runs/mfnet --inputs 00001D.png 00002N.png --out out/
    # a folder in the dataset's layout (MFNet: images/; FMB: Visible/ Infrared/;
    # VDT-2048: V/ D/ T/; custom: rgb/ thermal/ ...), optionally one split (list or folder)
    python -m fusionsam_jax.predict --workdir runs/mfnet --input_dir MFNet --split test --out out/
    # the run's own prepared dataset, one split (e.g. the demo's generated test images)
    python -m fusionsam_jax.predict --workdir runs/demo --split test --out runs/demo/predictions

A name missing for one modality, a folder without the layout (the message shows the expected
tree), a colour image given as thermal / depth, or a grey image given as RGB are refused
before the model is loaded. (``--grey_policy luma`` converts colour thermal / depth images to
luma instead: only for data known to be grey stored in colour.)

The config stored in the workdir says which modalities, classes and palette to use; the
segmentation stage's checkpoint (``--checkpoint best`` by val mIoU, ``latest`` or a step)
gives the params. For each sample NAME (the input's file name, which is the ground truth's),
OUT gets (each written atomically):

* ``labels/NAME.png``: class ids (single channel, 0..K-1), as the ground truth;
* ``color/NAME.png``: the prediction colour-coded with the dataset's palette;
* ``overlay/NAME.png``: the colours blended over the RGB input (or the fused image); class 0
  (unlabeled / background) is left as it is;
* ``fused/NAME.png``: the fused image (Fig. 1's fusion feature map), RGB;
* ``saliency/NAME.png`` (saliency task only): the salient-class probability x 255.

The metric CLIs read these folders directly:
``python -m fusionsam_jax.metrics.miou --pred_dir OUT/labels --gt_dir MFNet/labels
--split_list MFNet/test.txt --dataset mfnet`` (``--pred_dir OUT`` works too),
``python -m fusionsam_jax.metrics.sod --pred_dir OUT/saliency --gt_dir VDT-2048/Test/GT``.

Images are processed at their own resolution (padded at the bottom/right to a multiple of
``config.eval.pad_multiple``, outputs cropped back). Two inputs of one name (``a/x.png``,
``b/x.png``) would write the same outputs and are refused, as is an ``--out`` that is a file,
before the model is loaded. Exit status 0; 1 a bad input, missing checkpoint or write error
(one line); 2 a usage error.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from fusionsam_jax.cli import driver
from fusionsam_jax.config_lib import ATTN_IMPLS, ENCODER_DTYPES
from fusionsam_jax.data.inputs import MODALITIES

HEAVY = True
REQUIRED = ("workdir", "out")
POSITIONAL = True


def check_out_dir(out_dir: str) -> None:
  """Raises ValueError unless `out_dir` is a folder or can be made one: not an existing file
  (nor under one), and its nearest existing ancestor is writable."""
  p = os.path.abspath(out_dir)
  if os.path.lexists(p) and not os.path.isdir(p):
    raise ValueError(f"--out {out_dir}: is an existing file, expected a folder (predictions "
                     "go to OUT/labels/, OUT/color/, ...)")
  while not os.path.lexists(p):
    p = os.path.dirname(p)
  if not os.path.isdir(p):
    raise ValueError(f"--out {out_dir}: {p} is a file, so no folder can be made there")
  if not os.access(p, os.W_OK | os.X_OK):
    raise ValueError(f"--out {out_dir}: {p} is not writable")


def define(fv) -> dict:
  d = dict(flag_values=fv)
  return {
      "workdir": flags.DEFINE_string("workdir", None, "training run folder (config + "
                                     "checkpoints)", **d),
      "inputs": flags.DEFINE_multi_string(
          "inputs", [], "files that each hold a whole sample: MFNet 4-channel PNGs (RGB + "
          "thermal), or the images of a one-modality run; the arguments after --inputs are "
          "inputs too (--inputs A B C)", **d),
      **{m: flags.DEFINE_multi_string(
          m, [], f"{m} image(s) (repeat the flag); with the other modalities' files, paired "
          "by file name", **d) for m in MODALITIES},
      **{f"{m}_dir": flags.DEFINE_string(
          f"{m}_dir", None, f"a folder of {m} images, paired with the other modalities' "
          "folders by file name", **d) for m in MODALITIES},
      "input_dir": flags.DEFINE_string("input_dir", None, "a folder in the dataset's layout "
                                       "(its root)", **d),
      "split": flags.DEFINE_string("split", None, "with --input_dir: only this split; alone: "
                                   "that split of the run's own prepared dataset", **d),
      "out": flags.DEFINE_string("out", None, "output folder", **d),
      "checkpoint": flags.DEFINE_string("checkpoint", "best", "best | latest | STEP", **d),
      "grey_policy": flags.DEFINE_enum("grey_policy", "strict", ["strict", "luma"],
                                       "thermal/depth images with colour channels: refused "
                                       "(strict), or converted to luma (luma: only for grey "
                                       "data stored in colour)", **d),
      "attn_impl": flags.DEFINE_enum("attn_impl", None, list(ATTN_IMPLS),
                                     "SAM attention (None: as in the workdir config)", **d),
      "encoder_dtype": flags.DEFINE_enum(
          "encoder_dtype", None, list(ENCODER_DTYPES),
          "SAM image-encoder compute dtype (None: as in the workdir config)", **d),
      "progress": flags.DEFINE_bool("progress", None, "progress bar (None: when stderr is a "
                                    "terminal)", **d),
      "compilation_cache": driver.compilation_cache_flag(fv),
  }


def _prepared_split(config, split: str) -> list:
  """(name, element) of every image of `split` of the run's own prepared dataset."""
  from fusionsam_jax.data import paths, spec as D
  where = D.data_spec(config)
  paths.check_split(where.name, where.data_dir, split)
  source = D.ensure_data(config, say=lambda m: None).source(split)
  out = []
  for i in range(len(source)):
    el = source[i]
    name = el.get("name", str(i))
    name = name.decode() if isinstance(name, bytes) else str(name)
    out.append((name, {m: el[m] for m in config.model.modalities}))
  return out


def body(f, rest) -> int:
  from fusionsam_jax import config_lib, workdir as W
  from fusionsam_jax.data import inputs as I
  inputs = list(f["inputs"].value)
  if rest and not inputs:
    raise driver.UsageError(f"unexpected arguments: {' '.join(rest)}")
  inputs += rest  # --inputs A B C: absl leaves B C as positional arguments
  per_file = {m: list(f[m].value) for m in MODALITIES if f[m].value}
  per_dir = {m: f[f"{m}_dir"].value for m in MODALITIES if f[f"{m}_dir"].value}
  given = [n for n, v in (("--inputs", inputs), ("--input_dir", f["input_dir"].value),
                          ("--rgb/--thermal/--depth", per_file),
                          ("--rgb_dir/--thermal_dir/--depth_dir", per_dir)) if v]
  own_split = not given and f["split"].value
  if len(given) != 1 and not own_split:
    raise driver.UsageError(
        "give exactly one of --inputs, --input_dir, --rgb/--thermal/--depth (files), "
        "--rgb_dir/--thermal_dir/--depth_dir (folders), or --split alone (the run's own "
        "data)" + (f"; got {' and '.join(given)}" if given else ""))
  if f["split"].value and given and not f["input_dir"].value:
    raise driver.UsageError("--split needs --input_dir (or goes alone: the run's own data)")
  workdir, out_dir, progress = f["workdir"].value, f["out"].value, f["progress"].value
  check_out_dir(out_dir)
  driver.quiet_logs()
  driver.enable_compilation_cache(f["compilation_cache"].value)
  which = W.parse_checkpoint_arg(f["checkpoint"].value)
  config = W.load_config(workdir)
  config_lib.override_model(config, attn_impl=f["attn_impl"].value,
                            encoder_dtype=f["encoder_dtype"].value)
  mods = tuple(config.model.modalities)
  policy = f["grey_policy"].value
  if own_split:
    samples = _prepared_split(config, f["split"].value)
  elif inputs:
    samples = I.samples_from_files(inputs, mods, policy)
  elif per_file:
    samples = I.samples_from_modalities(per_file, mods, policy,
                                        source=" ".join(f"--{m}" for m in per_file))
  elif per_dir:
    samples = I.samples_from_dirs(per_dir, mods, policy)
  else:
    samples = I.samples_from_dir(f["input_dir"].value, config.dataset, mods, f["split"].value,
                                 policy)
  W.check_checkpoint_arg(workdir, which)
  from fusionsam_jax import fsutil
  from fusionsam_jax.inference import OUTPUT_DIRS, Predictor
  from fusionsam_jax.training.logging import progress_bar
  predictor = Predictor(workdir, which, config=config)
  os.makedirs(out_dir, exist_ok=True)
  for kind in OUTPUT_DIRS:   # temporary files of a killed predict (their process is gone)
    if os.path.isdir(os.path.join(out_dir, kind)):
      fsutil.clean_orphans(os.path.join(out_dir, kind), [fsutil.TEMP_FILE_PREFIX])
  bar = samples if progress is False else progress_bar(samples, desc="predict", unit="image")
  if progress is True and bar is samples:
    from tqdm import tqdm
    bar = tqdm(samples, desc="predict", unit="image")
  try:
    for name, el in bar:
      predictor.write(name, el, out_dir)
  except OSError as e:   # --out unwritable, full disk (each PNG is written atomically)
    raise OSError(e.errno, f"{e.filename or out_dir}: cannot write the predictions "
                  f"({e.strerror or e})") from None
  print(f"wrote {len(samples)} prediction(s) to {out_dir} (checkpoint {predictor.which}, "
        f"step {predictor.step})")
  return 0


def main(argv=None) -> int:
  """The command on `argv` (without the program name); returns its exit status."""
  return driver.run(sys.modules[__name__], argv)


if __name__ == "__main__":
  driver.main(sys.modules[__name__])
