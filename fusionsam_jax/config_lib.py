"""Building blocks of the experiment configs in ``configs/`` (config as code).

Every config file has ``get_config(arg=None) -> ml_collections.ConfigDict``. ``arg`` is the
text after the colon of ``--config configs/mfnet.py:ARG``: comma-separated variant names,
applied in order, e.g. ``configs/mfnet.py:tiny,rgb_only``. The variants every config knows:

* ``tiny``: a smoke-run model (tiny random SAM, small tokenizer and FMP, 96 x 128 crops,
  a few steps per stage). It still reads the config's dataset.
* ``generated``: train on a generated scene set in the dataset's layout (no download),
  made on first use (``config.generate``).
* ``ablation_a``: no LSTG; FMP on patch embeddings of the raw images (paper Sec. 4.4 (A)).
* ``ablation_b``: FMP replaced by concatenation + 1x1 conv (paper Sec. 4.4 (B)).
* ``rgb_only`` / ``thermal_only`` / ``depth_only``: one modality (fusion = concat).
* ``staged``: the official code's segmentation stage (fusion path frozen, f_s only, over
  cached SAM embeddings) instead of Eq. 1 jointly.
* ``no_cache``: (staged) segmentation stage on augmented inputs without the embedding cache.
* ``sam2``: FusionSAM on a SAM 2 backbone (``model.backbone="sam2_hiera_l"``, weights
  ``model.sam2_checkpoint``); after ``tiny`` (``tiny,sam2``) the tiny random SAM 2.

Paper settings (KDD '25, Sec. 4.1): Adam, lr 1e-4, weight decay 1e-3, batch 4, 100 epochs,
SAM ViT-H. Each stage runs ``num_epochs`` passes over the prepared train split, turned into
steps at run time from the split's real size and the stage's batch (``num_steps``, when set,
overrides it); validation runs every ``train.eval_every_epochs`` (or ``train.eval_every``
steps).
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

import ml_collections
from ml_collections import config_dict

from fusionsam_jax.errors import ConfigValueError

def model_config(*, modalities: tuple[str, ...], num_classes: int, task: str) -> ml_collections.ConfigDict:
  """The paper-scale model (ViT-H SAM, bf16 encoder with cuDNN attention)."""
  m = ml_collections.ConfigDict()
  m.modalities = tuple(modalities)
  m.num_classes = num_classes
  m.task = task
  m.scale = 4
  m.tokenizer_kind = "lstg"          # "lstg" | "patch" (ablation A)
  # Codebook health (docs/design.md): cosine codes searched in an 8-d factorized space
  # (ViT-VQGAN) + dead-code restart from batch encodings (train.stages.tokenizer,
  # Jukebox / SoundStream). VQGAN's plain 1024-code book collapsed to ~5 used codes.
  m.tokenizer = ml_collections.ConfigDict(dict(
      latent_dim=64, num_codes=1024, ch=64, num_res_blocks=2, beta=0.25, max_groups=32,
      l2_normalize=True, lookup_dim=8, usage_decay=0.8, entropy_weight=0.1,
      entropy_temperature=0.01))
  m.fusion = "fmp"                   # "fmp" | "concat" (ablation B)
  # Self-attention in shifted 8 x 8 windows (SwinFusion); the cross-domain (Eq. 9-10) and
  # complementary (Eq. 11-12) units attend over the whole latent map (Sec. 3.2.3's long-range
  # cross-modal dependencies), through cuDNN flash attention with attn_impl="cudnn".
  m.fmp = ml_collections.ConfigDict(dict(
      num_heads=4, depth_self=2, window_size=8, attention="window", cross_attention="global",
      mlp_ratio=2.0))
  # Heads of the cross-domain / complementary units (None: num_heads). 1 (one 64-wide head)
  # is the faster kernel (docs/design.md); left at num_heads until its effect on mIoU is
  # known.
  m.fmp.cross_num_heads = config_dict.placeholder(int)
  m.fused_decoder = ml_collections.ConfigDict(dict(ch=64, num_res_blocks=2, max_groups=32))
  # The fusion loss fixes only the fused image's luma; its colour comes from the RGB input, as
  # the official code combines its fused channel with the visible image's a/b ("decoder":
  # the decoder's own, unconstrained chroma).
  m.fused_color = "visible_chroma"
  m.discriminator = ml_collections.ConfigDict(dict(base_ch=64, n_layers=3))  # PatchGAN (Eq. 8)
  m.sam_variant = "vit_h"
  m.sam_checkpoint = config_dict.placeholder(str)
  m.sam_checkpoint = "ckpt/sam_vit_h"
  m.allow_random_sam = False
  # "sam": SAM's ViT (sam_variant, sam_checkpoint). "sam2_hiera_l" (or sam2_hiera_t / _s /
  # _b+, sam2_tiny): the fused image through SAM 2's Hiera trunk + FPN neck (frozen), the
  # semantic decoder on SAM 2's mask decoder with its high-res skips; weights from
  # sam2_checkpoint (tools/convert_sam2_weights.py). docs/design.md.
  m.backbone = "sam"
  m.sam2_checkpoint = config_dict.placeholder(str)
  m.encoder_dtype = "bfloat16"
  # The frozen fusion path (tokenizers, FMP, fused decoder) in the segmentation stage, the
  # embedding cache and evaluation: bf16 like the encoder it feeds (training computes in
  # model.train_dtype). "float32" for the exact path.
  m.fusion_dtype = "bfloat16"
  # Training compute of the tokenizers, discriminators, FMP and fused decoder (all stages):
  # bf16 over float32 params and Adam state; codebook search, norm statistics, softmax and
  # losses stay float32 (models/precision.py; the bf16-vs-float32 bounds per stage:
  # tests/test_mixed_precision.py; its speed and memory: docs/benchmarks.md). "float32":
  # the exact path.
  m.train_dtype = "bfloat16"
  m.attn_impl = "cudnn"
  m.num_points = 8
  # False: the segmentation stage optimises Eq. 1 (f_s + f_f) over everything but the SAM
  # encoder (the paper). True: the official code's staged way (fusion path frozen, the
  # embedding cache on): the variant ``staged``.
  m.freeze_fmp_in_segmentation = False
  m.train_sam_encoder = False        # backprop through the (still frozen) encoder's input
  return m


def _stage_overrides(d: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Optional per-stage ``batch_size`` / ``crop_size`` (None: ``train.batch_size`` /
  ``train.crop_size``)."""
  d.batch_size = config_dict.placeholder(int)
  d.crop_size = config_dict.placeholder(tuple)
  return d


def stages_config(epochs: float, *, lr: float = 1e-4,
                  weight_decay: float = 1e-3) -> ml_collections.ConfigDict:
  """Per-stage settings; durations in epochs (``num_steps`` set: that many steps)."""
  s = ml_collections.ConfigDict()
  s.tokenizer = ml_collections.ConfigDict(dict(
      num_epochs=epochs, lr=lr, weight_decay=weight_decay, disc_start_fraction=0.5,
      disc_weight=0.8, perceptual_weight=1.0, rec_weight=1.0,
      rec_loss="l2",  # Eq. 5 as the paper writes it
      # After every update, codes whose moving-average use per batch (model.tokenizer.
      # usage_decay) is below restart_threshold restart at random batch encodings.
      # Threshold relative: a share of the mean use per code (batch vectors / K); why 0.25
      # and the EMA code step below: docs/design.md, "Codebook health".
      restart_dead_codes=True, restart_threshold=0.25, restart_threshold_relative=True,
      # At the stage's end: codebook perplexity / dead codes and reconstruction over val.
      eval_codebook=True))
  s.tokenizer.disc_start = config_dict.placeholder(int)   # steps; None: the fraction
  # VQ-VAE's EMA codebook step (decay) in the restart pass; None: off (gradient updates only).
  s.tokenizer.code_ema = config_dict.FieldReference(0.9, field_type=float)
  s.fusion = ml_collections.ConfigDict(dict(
      num_epochs=epochs, lr=lr, weight_decay=weight_decay,
      weights=ml_collections.ConfigDict(dict(ssim=10.0, intensity=20.0, gradient=20.0))))
  s.segmentation = ml_collections.ConfigDict(dict(
      num_epochs=epochs, lr=lr, weight_decay=weight_decay, dice_weight=1.0,
      fusion_weight=1.0,   # Eq. 1's f_f next to f_s (joint mode)
      vq_weight=1.0))      # the tokenizers' Eq. 6 terms (joint mode)
  # One entry per stage of `fusionsam_jax.stages.registry` (checked when a run starts).
  for sc in s.values():
    sc.num_steps = config_dict.placeholder(int)
    sc.lr_schedule = "constant"   # the paper's; "cosine": lr -> 0 over the stage
    _stage_overrides(sc)
  return s


def base_config(dataset: str, *, num_classes: int, task: str, modalities: tuple[str, ...],
                crop_size: tuple[int, int], epochs: float = 100.0,
                batch_size: int = 4) -> ml_collections.ConfigDict:
  """Paper defaults for a real dataset (prepared with ``python -m fusionsam_jax.data.prepare``)."""
  c = ml_collections.ConfigDict()
  c.dataset = dataset
  c.data_dir = "data_cache"          # --data_dir of the prepare command
  c.seed = 0
  c.model = model_config(modalities=modalities, num_classes=num_classes, task=task)
  t = c.train = ml_collections.ConfigDict()
  t.batch_size = batch_size
  t.crop_size = tuple(crop_size)
  t.scale_range = (0.5, 2.0)
  t.flip_prob = 0.5
  # Input pipeline, sized to the host when None (data.spec.worker_count / device_prefetch):
  # grain worker processes (0 on <= 2 cores, else half the cores up to 8) and batches kept
  # on the devices ahead of the step.
  t.worker_count = config_dict.placeholder(int)
  t.device_prefetch = config_dict.placeholder(int)
  t.log_every = 50
  t.eval_every = config_dict.placeholder(int)   # steps; None: eval_every_epochs
  t.eval_every_epochs = 5.0
  t.checkpoint_every = 1000
  t.keep_latest = 1
  t.best_k = 3
  t.image_every = 2000
  t.grad_clip = 0.0                  # global-norm clip; 0 = off
  t.embedding_cache = ml_collections.ConfigDict(dict(
      enabled=True,                  # only with model.freeze_fmp_in_segmentation (staged)
      num_views=2,                   # 0: un-augmented, 1: flipped, >= 2: seeded random views
      seed=0,
      dtype="float16"))              # storage dtype of the cached embeddings
  t.stages = stages_config(epochs)
  e = c.eval = ml_collections.ConfigDict()
  e.batch_size = 4
  e.split = "test"
  e.val_split = "val"                # model selection (best-k); never the test split
  e.pad_multiple = 16
  e.after_training = True            # evaluate the best checkpoint on `split` at the end
  # Eq. 7's Phi: converted VGG16 .npz; None = the frozen SAM encoder's first
  # `perceptual_sam_blocks` blocks when model.sam_checkpoint is set, else off.
  c.perceptual_weights = config_dict.placeholder(str)
  c.perceptual_sam_blocks = 2
  return c


# -- variants --------------------------------------------------------------------------------


def _tiny(c: ml_collections.ConfigDict) -> None:
  m = c.model
  m.tokenizer = ml_collections.ConfigDict(dict(
      latent_dim=8, num_codes=64, ch=16, num_res_blocks=1, beta=0.25, max_groups=1,
      l2_normalize=True, lookup_dim=4, usage_decay=0.8, entropy_weight=0.1))
  m.fmp = ml_collections.ConfigDict(dict(
      num_heads=2, depth_self=1, window_size=8, attention="window", cross_attention="global",
      mlp_ratio=2.0))
  m.fused_decoder = ml_collections.ConfigDict(dict(ch=16, num_res_blocks=1, max_groups=1))
  m.discriminator = ml_collections.ConfigDict(dict(base_ch=16, n_layers=2))
  m.sam_variant = "tiny"
  m.sam_checkpoint = None
  m.allow_random_sam = True
  c.perceptual_sam_blocks = 1        # the tiny SAM has one windowed block before a global one
  m.encoder_dtype = "float32"
  m.fusion_dtype = "float32"
  m.train_dtype = "float32"
  m.attn_impl = "xla"
  m.num_points = 4
  t = c.train
  t.batch_size = 2
  t.crop_size = (96, 128)
  t.worker_count = 0
  t.log_every = 2
  t.eval_every = 4
  t.checkpoint_every = 4
  t.image_every = 0
  t.embedding_cache.num_views = 1
  t.embedding_cache.dtype = "float32"
  for sc in t.stages.values():
    sc.num_steps = 4
    sc.lr = 1e-3
  t.stages.tokenizer.disc_start = 2
  t.stages.tokenizer.eval_codebook = True    # (the demo turns it off)
  c.eval.batch_size = 2


def generate_config(num: int = 200, seed: int = 0, height: int | None = None,
                    width: int | None = None) -> ml_collections.ConfigDict:
  """``config.generate``: make a scene set in the dataset's layout on first use
  (`fusionsam_jax.data.generate_dataset`); height / width None = ``train.crop_size``."""
  g = ml_collections.ConfigDict()
  g.num = num
  g.seed = seed
  g.height = config_dict.placeholder(int)
  g.width = config_dict.placeholder(int)
  g.height, g.width = height, width
  return g


def _generated(c: ml_collections.ConfigDict) -> None:
  if c.get("generate") is None:
    c.generate = generate_config()


def _modality_only(name: str) -> Callable[[ml_collections.ConfigDict], None]:
  def apply(c: ml_collections.ConfigDict) -> None:
    if name not in c.model.modalities:
      raise ValueError(f"{name}_only: dataset {c.dataset} has modalities "
                       f"{tuple(c.model.modalities)}")
    c.model.modalities = (name,)
  return apply


def _modalities(*names: str) -> Callable[[ml_collections.ConfigDict], None]:
  """A subset of the dataset's modalities, in the dataset's order (Table 3's RGB + D and
  RGB + T rows on VDT-2048)."""
  def apply(c: ml_collections.ConfigDict) -> None:
    missing = [n for n in names if n not in c.model.modalities]
    if missing:
      raise ValueError(f"{'_'.join(names)}: dataset {c.dataset} has modalities "
                       f"{tuple(c.model.modalities)}")
    c.model.modalities = tuple(m for m in c.model.modalities if m in names)
  return apply


def _ablation_a(c):
  c.model.tokenizer_kind = "patch"


def _ablation_b(c):
  c.model.fusion = "concat"


def _no_cache(c):
  c.train.embedding_cache.enabled = False


def _staged(c):
  """The official code's way: fusion path frozen in the segmentation stage, which then
  trains prompts + decoder on f_s over cached SAM embeddings."""
  c.model.freeze_fmp_in_segmentation = True


def _sam2(c):
  """FusionSAM on SAM 2 Hiera-L; after ``tiny`` the tiny random SAM 2 (same code paths)."""
  m = c.model
  if m.sam_variant == "tiny":
    m.backbone, m.sam2_checkpoint = "sam2_tiny", None
  else:
    m.backbone, m.sam2_checkpoint = "sam2_hiera_l", "ckpt/sam2.1_hiera_l"


VARIANTS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {
    "tiny": _tiny,
    "generated": _generated,
    "ablation_a": _ablation_a,
    "ablation_b": _ablation_b,
    "rgb_only": _modality_only("rgb"),
    "thermal_only": _modality_only("thermal"),
    "depth_only": _modality_only("depth"),
    "rgb_depth": _modalities("rgb", "depth"),
    "rgb_thermal": _modalities("rgb", "thermal"),
    "no_cache": _no_cache,
    "staged": _staged,
    "sam2": _sam2,
}


def apply_variants(c: ml_collections.ConfigDict, arg: str | None,
                   extra: Mapping[str, Callable] | None = None) -> ml_collections.ConfigDict:
  """Applies the comma-separated variants of `arg` in order; records them in
  ``c.variant``."""
  table = dict(VARIANTS)
  table.update(extra or {})
  names = [a.strip() for a in str(arg or "").split(",") if a.strip()]
  unknown = [n for n in names if n not in table]
  if unknown:
    raise ValueError(f"unknown config variant(s) {unknown}; known: {sorted(table)} "
                     "(combine with commas, e.g. configs/mfnet.py:tiny,rgb_only)")
  for n in names:
    table[n](c)
  c.variant = ",".join(names)
  return c


# -- configs read back from a workdir ------------------------------------------------------------


def _tuplify(x):
  if isinstance(x, Mapping):
    return {k: _tuplify(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuplify(v) for v in x)
  return x


def config_from_dict(d: Mapping) -> ml_collections.ConfigDict:
  """A ConfigDict from the plain dict stored in ``workdir/config.json`` (JSON lists become
  tuples again)."""
  return ml_collections.ConfigDict(_tuplify(dict(d)))


# -- command-line overrides -------------------------------------------------------------------

#: Override text that means None: ``--config.model.sam_checkpoint=None`` (any field), and an
#: empty value for a field that may be None (a placeholder: ``--config.perceptual_weights=``).
NONE_TEXT = "None"


def normalize_overrides(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Turns the strings "None" (any field) and "" (fields that may be None) into None, in
  place; returns `c`. ml_collections' flag parser keeps ``--config.x=None`` as the string
  "None" for a string field. Every CLI that takes ``--config`` applies this after parsing."""
  if c is None:
    return c
  for key in list(c.keys()):
    v = c[key]
    if isinstance(v, ml_collections.ConfigDict):
      normalize_overrides(v)
    elif isinstance(v, str):
      # A placeholder field (config_dict.placeholder) is stored as a FieldReference: those
      # are the ones that may be None, where "" means None too.
      nullable = isinstance(c._fields.get(key), config_dict.FieldReference)  # pylint: disable=protected-access
      if v == NONE_TEXT or (v == "" and nullable):
        c[key] = None
  return c


ATTN_IMPLS = ("xla", "fused", "fused_bias", "cudnn", "cudnn_bias")
ENCODER_DTYPES = ("float32", "bfloat16", "float16")


def override_model(config, *, attn_impl: str | None = None,
                   encoder_dtype: str | None = None):
  """Sets ``model.attn_impl`` / ``model.encoder_dtype`` (None: keep) for evaluating or
  predicting on another machine, e.g. a cuDNN / bf16 GPU run on a CPU. Raises ValueError on
  unknown values. Returns `config` (changed in place)."""
  if attn_impl is not None:
    if attn_impl not in ATTN_IMPLS:
      raise ValueError(f"attn_impl {attn_impl!r}: expected one of {', '.join(ATTN_IMPLS)}")
    config.model.attn_impl = attn_impl
  if encoder_dtype is not None:
    if encoder_dtype not in ENCODER_DTYPES:
      raise ValueError(f"encoder_dtype {encoder_dtype!r}: expected one of "
                       f"{', '.join(ENCODER_DTYPES)}")
    config.model.encoder_dtype = encoder_dtype
  return config



#: Config keys holding file-system paths. A run stores them absolute, so a run folder does
#: not depend on the directory a later command runs from.
PATH_KEYS = ("data_dir", "model.sam_checkpoint", "model.sam2_checkpoint", "perceptual_weights")


def with_absolute_paths(config) -> ml_collections.ConfigDict:
  """A copy of `config` with the relative paths of `PATH_KEYS` made absolute (empty and
  absent ones unchanged)."""
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  for key in PATH_KEYS:
    node = d
    *parents, leaf = key.split(".")
    for p in parents:
      node = node.get(p) if isinstance(node, Mapping) else None
    if isinstance(node, dict) and isinstance(node.get(leaf), str) and node[leaf] \
        and node[leaf].lower() != "none":
      node[leaf] = os.path.abspath(os.path.expanduser(node[leaf]))
  return config_from_dict(d)


#: Storage dtypes the embedding cache may use (floating: an integer dtype would round the
#: embeddings).
CACHE_DTYPES = ("float32", "float16", "bfloat16")


def check_values(config) -> None:
  """Raises `ConfigValueError` naming the first config value outside its meaning, before anything is
  written or trained: the selection split (never a test split), the embedding cache's dtype,
  learning rates, augmentation ranges, batch / crop / padding sizes, step counts."""
  t, e = config.train, config.eval

  def bad(key, value, expected):
    raise ConfigValueError(f"--config.{key}={value!r}: expected {expected}")

  if str(e.val_split).split("[")[0].startswith("test"):
    bad("eval.val_split", e.val_split, "a split that is not a test split (model selection "
        "never sees test data; use val)")
  dtype = str(t.get("embedding_cache", {}).get("dtype", "float16"))
  if dtype not in CACHE_DTYPES:
    bad("train.embedding_cache.dtype", dtype, f"one of {', '.join(CACHE_DTYPES)}")
  if not 0.0 <= float(t.get("flip_prob", 0.0)) <= 1.0:
    bad("train.flip_prob", t.flip_prob, "a probability in [0, 1]")
  lo, hi = (float(x) for x in t.get("scale_range", (1.0, 1.0)))
  if not 0.0 < lo <= hi:
    bad("train.scale_range", tuple(t.scale_range), "(low, high) with 0 < low <= high")
  for key, value in (("train.batch_size", t.batch_size), ("eval.batch_size", e.batch_size),
                     ("eval.pad_multiple", e.get("pad_multiple", 1))):
    if value is None or int(value) < 1:
      bad(key, value, "a positive integer")
  if len(tuple(t.crop_size)) != 2 or min(int(x) for x in t.crop_size) < 1:
    bad("train.crop_size", tuple(t.crop_size), "(height, width), both positive")
  for name, sc in t.stages.items():
    if float(sc.get("lr", 1.0)) <= 0:
      bad(f"train.stages.{name}.lr", sc.lr, "a positive learning rate")
    steps = sc.get("num_steps")
    if steps is not None and int(steps) < 0:
      bad(f"train.stages.{name}.num_steps", steps, "0 or more (None: from num_epochs)")
    for k in ("batch_size",):
      v = sc.get(k)
      if v is not None and int(v) < 1:
        bad(f"train.stages.{name}.{k}", v, "a positive integer (None: train.batch_size)")
