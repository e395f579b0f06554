r"""Segment new images with a trained FusionSAM run; writes PNGs.

    # one sample: the modality images in the config's order (rgb, thermal [, ...])
    python -m fusionsam_jax.predict --workdir runs/mfnet --inputs rgb.png thermal.png --out out/
    # several samples: repeat the groups; an MFNet 4-channel PNG (RGB + thermal) is one sample
    python -m fusionsam_jax.predict --workdir runs/mfnet --inputs 00001D.png 00002N.png --out out/
    # a folder in the dataset's layout (MFNet: images/; FMB: Visible/ Infrared/;
    # VDT-2048: V/ D/ T/), optionally restricted to a split (split list or split folder)
    python -m fusionsam_jax.predict --workdir runs/mfnet --input_dir MFNet --split test --out out/

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
--split_list MFNet/test.txt --num_classes 9`` (``--pred_dir OUT`` works too),
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

import numpy as np

from fusionsam_jax.inference import OUTPUT_DIRS, Predictor, overlay, write_outputs  # noqa: F401


class InputError(ValueError):
  """Unusable --inputs / --input_dir."""


def _read(path: str) -> np.ndarray:
  from fusionsam_jax.data.io import read_image
  return read_image(path)


def _as_modality(arr: np.ndarray, modality: str, path: str, grey_policy: str) -> np.ndarray:
  from fusionsam_jax.data.io import to_grey, to_rgb
  if modality == "rgb":
    if arr.shape[-1] == 1:
      raise InputError(f"{path}: expected an RGB image for modality 'rgb', got 1 channel")
    return to_rgb(arr, path)
  return to_grey(arr, path, grey_policy)


def _is_mfnet_combined(arr: np.ndarray) -> bool:
  """A 4-channel PNG whose 4th channel is not an opaque alpha: MFNet's RGB + thermal."""
  return arr.ndim == 3 and arr.shape[-1] == 4 and not np.all(arr[..., 3] == 255)


def samples_from_files(files: list[str], modalities: tuple[str, ...],
                       grey_policy: str = "strict", source: str = "--inputs"
                       ) -> list[tuple[str, dict]]:
  """Groups `files` into samples: an MFNet 4-channel PNG (RGB + thermal) is one sample when
  the run's modalities are within (rgb, thermal); otherwise each sample takes one file per
  modality, in the config's modality order. A sample is named after its first file; two
  samples of one name (``a/x.png``, ``b/x.png``) would write the same outputs and raise
  InputError. `source` names the flag in messages."""
  out = []
  i = 0
  mods = tuple(modalities)
  first_file: dict[str, str] = {}
  while i < len(files):
    name = os.path.splitext(os.path.basename(files[i]))[0]
    if name in first_file:
      raise InputError(
          f"{source}: {first_file[name]} and {files[i]} are both named {name!r}: their "
          f"outputs (OUT/labels/{name}.png, ...) would overwrite each other; give inputs "
          "distinct file names")
    first_file[name] = files[i]
    first = _read(files[i])
    if _is_mfnet_combined(first) and set(mods) <= {"rgb", "thermal"}:
      parts = {"rgb": np.ascontiguousarray(first[..., :3]),
               "thermal": np.ascontiguousarray(first[..., 3:])}
      out.append((name, {m: parts[m] for m in mods}))
      i += 1
      continue
    group = files[i:i + len(mods)]
    if len(group) < len(mods):
      raise InputError(
          f"{source}: {len(files)} files do not group into samples of {len(mods)} "
          f"({', '.join(mods)}); the last sample starting at {files[i]} is incomplete")
    el = {}
    for j, (m, p) in enumerate(zip(mods, group)):
      el[m] = _as_modality(first if j == 0 else _read(p), m, p, grey_policy)
    shapes = {m: a.shape[:2] for m, a in el.items()}
    if len(set(shapes.values())) != 1:
      raise InputError(f"{source} {group}: images of one sample differ in size: {shapes}")
    out.append((name, el))
    i += len(mods)
  return out


def samples_from_dir(root: str, dataset: str, modalities: tuple[str, ...],
                     split: str | None = None, grey_policy: str = "strict"
                     ) -> list[tuple[str, dict]]:
  """Samples of a folder in the dataset's layout (labels are not needed)."""
  from fusionsam_jax.data import layouts
  from fusionsam_jax.data.info import get_info
  info = get_info(dataset)
  layout = layouts.get_layout(info.name)
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise InputError(f"--input_dir {root}: not a folder")
  if info.name == "mfnet":
    img_dir = os.path.join(root, "images") if os.path.isdir(os.path.join(root, "images")) \
        else root
    names = sorted(os.path.splitext(f)[0] for f in os.listdir(img_dir)
                   if f.lower().endswith(".png") and not f.startswith("."))
    if split:
      lst = os.path.join(root, f"{split}.txt")
      if not os.path.isfile(lst):
        raise InputError(f"{lst}: no split list for --split {split}")
      names = layouts.read_split_list(lst)
    if not names:
      raise InputError(f"{img_dir}: no .png images")
    return samples_from_files([os.path.join(img_dir, f"{n}.png") for n in names], modalities,
                              grey_policy, source=f"--input_dir {root}")
  # Folder-per-modality layouts (FMB, VDT-2048).
  base = root
  if split:
    sub = layout.split_dirs.get(split, split)
    base = os.path.join(root, sub)
    if not os.path.isdir(base):
      raise InputError(f"{base}: no folder for --split {split} "
                       f"(expected one of {sorted(layout.split_dirs.values())})")
  dirs = {m: os.path.join(base, layout.role_dirs[m]) for m in modalities}
  for m, d in dirs.items():
    if not os.path.isdir(d):
      raise InputError(f"{d}: missing {m} folder (layout of {info.name}: "
                       f"{', '.join(layout.role_dirs[x] for x in modalities)} under {base})")
  from fusionsam_jax.data.io import IMAGE_SUFFIXES
  first = dirs[modalities[0]]
  stems = sorted(os.path.splitext(f)[0] for f in os.listdir(first)
                 if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES and not f.startswith("."))
  files = []
  for s in stems:
    for m in modalities:
      cands = [f for f in os.listdir(dirs[m]) if os.path.splitext(f)[0] == s]
      if not cands:
        raise InputError(f"{os.path.join(dirs[m], s)}.*: missing {m} image of sample {s}")
      files.append(os.path.join(dirs[m], cands[0]))
  return samples_from_files(files, modalities, grey_policy, source=f"--input_dir {root}")


def check_out_dir(out_dir: str) -> None:
  """Raises InputError unless `out_dir` is a folder or can be made one: not an existing file
  (nor under one), and its nearest existing ancestor is writable."""
  p = os.path.abspath(out_dir)
  if os.path.lexists(p) and not os.path.isdir(p):
    raise InputError(f"--out {out_dir}: is an existing file, expected a folder (predictions "
                     "go to OUT/labels/, OUT/color/, ...)")
  while not os.path.lexists(p):
    p = os.path.dirname(p)
  if not os.path.isdir(p):
    raise InputError(f"--out {out_dir}: {p} is a file, so no folder can be made there")
  if not os.access(p, os.W_OK | os.X_OK):
    raise InputError(f"--out {out_dir}: {p} is not writable")


def define_model_override_flags(fv) -> dict:
  """--attn_impl / --encoder_dtype: run a workdir on another machine (e.g. a cuDNN + bf16 GPU
  run on a CPU). cuDNN attention falls back to XLA by itself where cuDNN is absent."""
  from absl import flags
  from fusionsam_jax.config_lib import ATTN_IMPLS, ENCODER_DTYPES
  return {
      "attn_impl": flags.DEFINE_enum("attn_impl", None, list(ATTN_IMPLS),
                                     "SAM attention (None: as in the workdir config)",
                                     flag_values=fv),
      "encoder_dtype": flags.DEFINE_enum(
          "encoder_dtype", None, list(ENCODER_DTYPES),
          "SAM image-encoder compute dtype (None: as in the workdir config)", flag_values=fv),
  }


def define_flags(fv) -> dict:
  from absl import flags
  d = dict(flag_values=fv)
  return {
      "workdir": flags.DEFINE_string("workdir", None, "training run folder (config + "
                                     "checkpoints)", **d),
      "inputs": flags.DEFINE_multi_string(
          "inputs", [], "image files, one per modality per sample (config order), or MFNet "
          "4-channel PNGs; the arguments after --inputs are inputs too (--inputs A B C)", **d),
      "input_dir": flags.DEFINE_string("input_dir", None, "a folder in the dataset's layout",
                                       **d),
      "split": flags.DEFINE_string("split", None, "with --input_dir: only this split", **d),
      "out": flags.DEFINE_string("out", None, "output folder", **d),
      "checkpoint": flags.DEFINE_string("checkpoint", "best", "best | latest | STEP", **d),
      "grey_policy": flags.DEFINE_enum("grey_policy", "strict", ["strict", "luma"],
                                       "thermal/depth images stored in colour: error (strict) "
                                       "or luma", **d),
      **define_model_override_flags(fv),
      "progress": flags.DEFINE_bool("progress", None, "progress bar (None: when stderr is a "
                                    "terminal)", **d),
  }


def _main(f, rest) -> int:
  from fusionsam_jax.cli.driver import UsageError
  inputs = list(f["inputs"].value)
  if rest and not inputs:
    raise UsageError(f"unexpected arguments: {' '.join(rest)}")
  inputs += rest  # --inputs A B C: absl leaves B C as positional arguments
  if bool(inputs) == bool(f["input_dir"].value):
    raise UsageError("give exactly one of --inputs and --input_dir")
  if f["split"].value and not f["input_dir"].value:
    raise UsageError("--split needs --input_dir")
  from fusionsam_jax import experiment, workdir as W
  from fusionsam_jax.cli.driver import quiet_logs
  from fusionsam_jax.models.sam.checkpoint import CheckpointError
  from fusionsam_jax.data import DatasetError
  quiet_logs()
  workdir, out_dir, progress = f["workdir"].value, f["out"].value, f["progress"].value
  try:
    check_out_dir(out_dir)
    which = experiment.parse_checkpoint_arg(f["checkpoint"].value)
    config = W.load_config(workdir)
    from fusionsam_jax.config_lib import override_model
    override_model(config, attn_impl=f["attn_impl"].value,
                   encoder_dtype=f["encoder_dtype"].value)
    mods = tuple(config.model.modalities)
    if inputs:
      samples = samples_from_files(inputs, mods, f["grey_policy"].value)
    else:
      samples = samples_from_dir(f["input_dir"].value, config.dataset, mods, f["split"].value,
                                 f["grey_policy"].value)
    predictor = Predictor(workdir, which, config=config)
    os.makedirs(out_dir, exist_ok=True)
    from tqdm import tqdm
    for name, el in tqdm(samples, desc="predict", unit="image", disable=(
        not sys.stderr.isatty() if progress is None else not progress)):
      predictor.write(name, el, out_dir)
  except (experiment.SetupError, CheckpointError, DatasetError, InputError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except OSError as e:   # --out unwritable, full disk (each PNG is written atomically)
    where = e.filename or out_dir
    print(f"error: {where}: cannot write the predictions ({e.strerror or e})", file=sys.stderr)
    return 1
  print(f"wrote {len(samples)} prediction(s) to {out_dir} (checkpoint {predictor.which}, "
        f"step {predictor.step})")
  return 0


def main(argv=None) -> int:
  """``python -m fusionsam_jax.predict``; `argv` without the program name."""
  from fusionsam_jax.cli.driver import run_cli
  return run_cli(define_flags, _main, argv, prog="python -m fusionsam_jax.predict",
                 doc=__doc__, required=("workdir", "out"), positional=True)


if __name__ == "__main__":
  sys.exit(main())
