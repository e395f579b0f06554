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

import numpy as np

from fusionsam_jax.data.datasets import get as get_info
from fusionsam_jax.data.datasets.base import as_modality, image_table
from fusionsam_jax.data.io import IMAGE_SUFFIXES, DatasetError, read_image, to_rgb, write_png
from fusionsam_jax.fsutil import atomic_file


#: Modalities with their own input flags (--rgb, --rgb_dir, ...).
MODALITIES = ("rgb", "thermal", "depth")


class InputError(ValueError):
  """Unusable inputs (files, folders, names)."""


def _read(path: str) -> np.ndarray:
  return read_image(path)


def _stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def _is_mfnet_combined(arr: np.ndarray) -> bool:
  """A 4-channel PNG whose 4th channel is not an opaque alpha: MFNet's RGB + thermal."""
  return arr.ndim == 3 and arr.shape[-1] == 4 and not np.all(arr[..., 3] == 255)


def _check_unique(names_files: list[tuple[str, str]], source: str) -> None:
  first: dict[str, str] = {}
  for name, f in names_files:
    if name in first:
      raise InputError(
          f"{source}: {first[name]} and {f} are both named {name!r}: their outputs "
          f"(OUT/labels/{name}.png, ...) would overwrite each other; give inputs distinct "
          "file names")
    first[name] = f


def _load(files: dict[str, str], modalities, grey_policy: str, source: str) -> dict:
  """modality -> checked array of one sample's files (modality -> path)."""
  el = {m: as_modality(_read(files[m]), m, files[m], grey_policy) for m in modalities}
  shapes = {m: a.shape[:2] for m, a in el.items()}
  if len(set(shapes.values())) != 1:
    raise InputError(f"{source}: the images of sample {_stem(files[modalities[0]])!r} differ "
                     f"in size: " + ", ".join(f"{files[m]} {shapes[m][1]}x{shapes[m][0]}"
                                             for m in modalities))
  return el


def samples_from_files(files: list[str], modalities: tuple[str, ...],
                       grey_policy: str = "strict", source: str = "--inputs"
                       ) -> list[tuple[str, dict]]:
  """Samples of files that each hold a WHOLE sample (``--inputs``): for a one-modality run
  its image, for an RGB + thermal run an MFNet 4-channel PNG (RGB + thermal as channel 4).
  Separate per-modality files are never grouped by their order: a file that is not a whole
  sample raises InputError pointing at `samples_from_modalities` (``--rgb`` / ``--thermal``
  ...). A sample is named after its file; two of one name raise InputError. `source` names
  the flag in messages."""
  mods = tuple(modalities)
  _check_unique([(_stem(f), f) for f in files], source)
  out = []
  for f in files:
    arr = _read(f)
    if len(mods) == 1:
      out.append((_stem(f), {mods[0]: as_modality(arr, mods[0], f, grey_policy)}))
    elif _is_mfnet_combined(arr) and set(mods) <= {"rgb", "thermal"}:
      parts = {"rgb": np.ascontiguousarray(arr[..., :3]),
               "thermal": np.ascontiguousarray(arr[..., 3:])}
      out.append((_stem(f), {m: parts[m] for m in mods}))
    else:
      flags = " ".join(f"--{m} PATH" for m in mods)
      raise InputError(
          f"{source}: {f} ({arr.shape[-1]} channel(s)) is not a whole {'+'.join(mods)} "
          f"sample (an MFNet 4-channel PNG); give each modality's files with {flags} (or "
          f"{' '.join(f'--{m}_dir DIR' for m in mods)}): they are paired by file name")
  return out


def samples_from_modalities(files: dict[str, list[str]], modalities: tuple[str, ...],
                            grey_policy: str = "strict", source: str = "inputs"
                            ) -> list[tuple[str, dict]]:
  """Samples from per-modality file lists (``--rgb A --thermal B``), paired by file name.

  With one file per modality that file pair is the sample (named after the first
  modality's file, whatever the names); with more, files are matched by name (stem) and any
  name missing for a modality raises InputError naming it. Order never pairs files."""
  mods = tuple(modalities)
  extra = sorted(set(files) - set(mods))
  missing = [m for m in mods if not files.get(m)]
  if extra or missing:
    raise InputError(f"{source}: this run reads {'+'.join(mods)}: "
                     + (f"missing --{missing[0]}" if missing else f"unexpected --{extra[0]}"))
  if all(len(files[m]) == 1 for m in mods):
    group = {m: files[m][0] for m in mods}
    return [(_stem(group[mods[0]]), _load(group, mods, grey_policy, source))]
  tables = {}
  for m in mods:
    _check_unique([(_stem(f), f) for f in files[m]], f"--{m}")
    tables[m] = {_stem(f): f for f in files[m]}
  return _pair(tables, {m: f"--{m}" for m in mods}, mods, grey_policy, source)


def _pair(tables: dict[str, dict[str, str]], where: dict[str, str], mods, grey_policy: str,
          source: str) -> list[tuple[str, dict]]:
  names = sorted(set().union(*[set(t) for t in tables.values()]))
  problems = []
  for m in mods:
    lacking = [n for n in names if n not in tables[m]]
    if lacking:
      shown = ", ".join(lacking[:5]) + (f", ... ({len(lacking)} in all)"
                                        if len(lacking) > 5 else "")
      problems.append(f"no {m} image in {where[m]} for name(s) {shown}")
  if problems:
    raise InputError(f"{source}: {'; '.join(problems)}: files are paired by name (stem), "
                     "give every modality the same names")
  return [(n, _load({m: tables[m][n] for m in mods}, mods, grey_policy, source))
          for n in names]


def samples_from_dirs(dirs: dict[str, str], modalities: tuple[str, ...],
                      grey_policy: str = "strict") -> list[tuple[str, dict]]:
  """Samples from one folder per modality (``--rgb_dir A --thermal_dir B``), paired by file
  name (stem); a name missing in one folder raises InputError naming it."""
  mods = tuple(modalities)
  extra = sorted(set(dirs) - set(mods))
  missing = [m for m in mods if not dirs.get(m)]
  if extra or missing:
    raise InputError(f"this run reads {'+'.join(mods)}: "
                     + (f"missing --{missing[0]}_dir" if missing else
                        f"unexpected --{extra[0]}_dir"))
  tables = {}
  for m in mods:
    d = dirs[m]
    if not os.path.isdir(d):
      raise InputError(f"--{m}_dir {d}: not a folder")
    try:
      tables[m] = image_table(d)
    except DatasetError as e:
      raise InputError(f"--{m}_dir {d}: {e}") from None
    if not tables[m]:
      raise InputError(f"--{m}_dir {d}: no images ({', '.join(IMAGE_SUFFIXES)})")
  return _pair(tables, {m: dirs[m] for m in mods}, mods, grey_policy,
               " ".join(f"--{m}_dir {dirs[m]}" for m in mods))


def samples_from_dir(root: str, dataset, modalities: tuple[str, ...],
                     split: str | None = None, grey_policy: str = "strict"
                     ) -> list[tuple[str, dict]]:
  """Samples of a folder in the dataset's layout (labels are not needed), files matched by
  name. A folder without the layout raises InputError with the expected tree."""
  spec = get_info(dataset)
  root = os.fspath(root)
  source = f"--input_dir {root}"
  if not os.path.isdir(root):
    raise InputError(f"{source}: not a folder")
  try:
    samples = spec.layout.input_samples(root, modalities, split)
    _check_unique([(s.name, s.files[0][1]) for s in samples], source)
    return [(s.name, spec.layout.load_inputs(s, modalities, grey_policy)) for s in samples]
  except DatasetError as e:
    raise InputError(f"{source}: {e}") from None


def _write_png_atomic(path: str, arr: np.ndarray) -> None:
  with atomic_file(path) as tmp:
    write_png(tmp, arr)


class Predictor:
  """A trained run, ready to segment samples: ``Predictor(workdir)(element) -> outputs``."""

  def __init__(self, workdir: str, checkpoint: str | int = "best", config=None):
    import jax
    from fusionsam_jax import experiment, workdir as W
    from fusionsam_jax.models.functional import predict_fn
    self.config = config if config is not None else W.load_config(workdir)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    ctx = experiment.context(self.config, workdir, mesh=mesh, data=False, progress=False)
    self.model = ctx.model
    self.params, self.step, self.which = experiment.restore_params(
        self.config, workdir, checkpoint, ctx=ctx)
    self.info = get_info(self.config.dataset)
    self.modalities = tuple(self.config.model.modalities)
    self.pad_multiple = int(self.config.eval.pad_multiple)
    self._predict = jax.jit(predict_fn(self.model))

  def __call__(self, element: dict) -> dict:
    """element: modality -> uint8 (H, W, C). Returns pred (H, W) int32, fused (H, W, 3)
    uint8, prob (H, W) float (saliency) -- cropped to the input size."""
    import jax
    h, w = element[self.modalities[0]].shape[:2]
    m = self.pad_multiple
    th, tw = -(-h // m) * m, -(-w // m) * m
    batch = {}
    for k in self.modalities:
      a = np.asarray(element[k])
      a = a[..., None] if a.ndim == 2 else a
      batch[k] = np.pad(a, [(0, th - h), (0, tw - w), (0, 0)])[None]
    out = jax.device_get(self._predict(self.params, batch))
    res = {"pred": np.asarray(out["pred"])[0, :h, :w].astype(np.int32),
           "fused": np.round(np.clip(np.asarray(out["fused"])[0, :h, :w], 0, 1) * 255
                             ).astype(np.uint8)}
    if self.config.model.task == "saliency":
      logits = np.asarray(out["logits"], np.float32)[0, :h, :w]
      e = np.exp(logits - logits.max(-1, keepdims=True))
      res["prob"] = (e / e.sum(-1, keepdims=True))[..., 1]
    return res

  def write(self, name: str, element: dict, out_dir: str) -> list[str]:
    """Segments `element` and writes its outputs (`write_outputs`); returns the paths."""
    return write_outputs(out_dir, name, self(element), element, self.info.palette)


#: Output sub-folders of `predict`, each holding ``<name>.png`` (the ground truth's name).
OUTPUT_DIRS = ("labels", "color", "overlay", "fused", "saliency")


def overlay(base: np.ndarray, pred: np.ndarray, palette, alpha: float = 0.5) -> np.ndarray:
  """The palette colours of `pred` blended over `base` (uint8 (H, W, 3)) with weight
  `alpha`; class 0 (unlabeled / background) is left unblended, so the scene stays visible."""
  base = to_rgb(np.asarray(base), "overlay base")
  lut = np.zeros((256, 3), np.uint8)
  lut[:len(palette)] = np.asarray(palette, np.uint8)
  pred = np.asarray(pred)
  color = lut[pred.astype(np.uint8)].astype(np.float32)
  mixed = np.round((1 - alpha) * base.astype(np.float32) + alpha * color).astype(np.uint8)
  return np.where((pred == 0)[..., None], base, mixed)


def write_outputs(out_dir: str, name: str, res: dict, element: dict, palette) -> list[str]:
  """Writes one sample's outputs, each atomically, as ``OUT/<kind>/<name>.png``:

  * ``labels/``: class ids (single channel, 0..K-1): the ground truth's format and name, so
    ``python -m fusionsam_jax.metrics.miou --pred_dir OUT/labels --gt_dir GT`` reads them;
  * ``color/``: the prediction in the dataset's palette;
  * ``overlay/``: the palette colours blended over the RGB input (or the fused image), class 0
    left unblended;
  * ``fused/``: the fused image (RGB);
  * ``saliency/`` (saliency task): the salient-class probability x 255, for
    ``python -m fusionsam_jax.metrics.sod --pred_dir OUT/saliency``.

  `res` is `Predictor.__call__`'s result (pred, fused [, prob]).
  """
  pred = np.asarray(res["pred"])
  if pred.min(initial=0) < 0 or pred.max(initial=0) > 255:
    raise ValueError(f"{name}: class ids outside 0..255 cannot be written as 8-bit PNG")
  lut = np.zeros((256, 3), np.uint8)
  lut[:len(palette)] = np.asarray(palette, np.uint8)
  base = element["rgb"] if "rgb" in element else res["fused"]
  files = {"labels": pred.astype(np.uint8), "color": lut[pred.astype(np.uint8)],
           "overlay": overlay(base, pred, palette), "fused": res["fused"]}
  if "prob" in res:
    files["saliency"] = np.round(np.clip(res["prob"], 0, 1) * 255).astype(np.uint8)
  paths = []
  for kind, arr in files.items():
    d = os.path.join(out_dir, kind)
    os.makedirs(d, exist_ok=True)
    p = os.path.join(d, f"{name}.png")
    _write_png_atomic(p, arr)
    paths.append(p)
  return paths


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
      "split": flags.DEFINE_string("split", None, "with --input_dir: only this split", **d),
      "out": flags.DEFINE_string("out", None, "output folder", **d),
      "checkpoint": flags.DEFINE_string("checkpoint", "best", "best | latest | STEP", **d),
      "grey_policy": flags.DEFINE_enum("grey_policy", "strict", ["strict", "luma"],
                                       "thermal/depth images with colour channels: refused "
                                       "(strict), or converted to luma (luma: only for grey "
                                       "data stored in colour)", **d),
      **define_model_override_flags(fv),
      "progress": flags.DEFINE_bool("progress", None, "progress bar (None: when stderr is a "
                                    "terminal)", **d),
  }


def _main(f, rest) -> int:
  from fusionsam_jax.cli_common import UsageError
  inputs = list(f["inputs"].value)
  if rest and not inputs:
    raise UsageError(f"unexpected arguments: {' '.join(rest)}")
  inputs += rest  # --inputs A B C: absl leaves B C as positional arguments
  per_file = {m: list(f[m].value) for m in MODALITIES if f[m].value}
  per_dir = {m: f[f"{m}_dir"].value for m in MODALITIES if f[f"{m}_dir"].value}
  given = [n for n, v in (("--inputs", inputs), ("--input_dir", f["input_dir"].value),
                          ("--rgb/--thermal/--depth", per_file),
                          ("--rgb_dir/--thermal_dir/--depth_dir", per_dir)) if v]
  if len(given) != 1:
    raise UsageError("give exactly one of --inputs, --input_dir, --rgb/--thermal/--depth "
                     "(files) and --rgb_dir/--thermal_dir/--depth_dir (folders)"
                     + (f"; got {' and '.join(given)}" if given else ""))
  if f["split"].value and not f["input_dir"].value:
    raise UsageError("--split needs --input_dir")
  from fusionsam_jax import experiment, workdir as W
  from fusionsam_jax.cli_common import quiet_logs
  from fusionsam_jax.models.sam.checkpoint import CheckpointError
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
    elif per_file:
      samples = samples_from_modalities(per_file, mods, f["grey_policy"].value,
                                        source=" ".join(f"--{m}" for m in per_file))
    elif per_dir:
      samples = samples_from_dirs(per_dir, mods, f["grey_policy"].value)
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
  from fusionsam_jax.cli_common import run_cli
  return run_cli(define_flags, _main, argv, prog="python -m fusionsam_jax.predict",
                 doc=__doc__, required=("workdir", "out"), positional=True)


if __name__ == "__main__":
  sys.exit(main())
