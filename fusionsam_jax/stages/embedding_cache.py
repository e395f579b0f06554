"""SAM image-embedding cache for the segmentation stage.

When ``model.freeze_fmp_in_segmentation`` is True, nothing upstream of the frozen SAM image
encoder trains in the segmentation stage (tokenizers, fusion module, fused-image decoder and
the encoder itself are frozen), so the embedding of an input never changes during the stage.
The encoder is by far the most expensive part of a step (ViT-H: ~6 TFLOP per image), so we
compute every embedding once (`models.functional.cache_fn`, which also returns the fusion latents that
the prompts are made from) and reuse it.

**Augmentation.** Random augmentation draws a new view of an image at every step, and an
embedding can only be cached for a view that is known in advance. With the cache on, the
segmentation stage therefore trains on a *fixed* set of ``train.embedding_cache.num_views``
views per training image, made once:

* view 0: the image at scale 1, centre crop (or centre padding) to ``train.crop_size``;
* view 1: view 0 mirrored left-right;
* views 2, 3, ...: random scale in ``train.scale_range`` / crop / flip drawn from
  ``numpy.random.default_rng([seed, index, view])`` (the training pipeline's own
  `RandomScaleCropFlip`, so the same geometry as augmented training).

The cached views (inputs, labels and embeddings) are shuffled every epoch by a grain sampler.
Set ``train.embedding_cache.enabled=False`` (variant ``no_cache``) to train the stage on
freshly augmented inputs with the encoder in every step instead. Validation images are
cached as the eval loader yields them (full resolution, padded, ``valid`` masks).

**Key.** A cache is valid for exactly what it was computed from; its key is a hash of:
the params of the tokenizers / patch embeddings, the fusion module, the fused-image decoder
and the SAM image encoder (every leaf's bytes; ``ParamLayout.embedding_inputs``); the prepared split's files (or, for an
in-memory source, every element); the view settings (crop size, scale range, number of views,
seed); the model settings that change the embedding (modalities, sizes, SAM variant, encoder
dtype, attention implementation); and the storage dtype. A different key means a rebuild;
the caches of other keys for that split are then deleted.

**Storage.** ``WORKDIR/embedding_cache/<split>-<key>/``: ``meta.json``; for ``train``:
``<modality>.npy`` (uint8, N x H x W x C), ``label.npy`` (uint8), ``embeddings.npy``
(N x e x e x C, ``dtype``) and ``fusion.npy`` (the fusion latents, N x H/4 x W/4 x d_c,
``dtype``: with both cached, a training step runs only the prompts and the mask decoder),
read through memory maps (written with plain file writes, so that a full disk is an error,
not a crash); for ``val``: one ``batch_XXXXX.npz`` per eval batch (embeddings).
A cache is written into a temporary folder that is renamed into place when
complete, so an interrupted build leaves nothing that looks valid; a failed build removes it,
the temporary folders of killed runs are removed when the next run takes the workdir's lock
(`workdir.remove_orphans`).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fusionsam_jax import training as T
from fusionsam_jax.data.paths import dataset_dir
from fusionsam_jax.data.pipeline import (process_shard_options, RandomScaleCropFlip,
                                         scale_crop_flip, Standardize)
from fusionsam_jax.data.spec import eval_iterable, stage_batch_size, strip_batch
from fusionsam_jax.models.functional import cache_fn
from fusionsam_jax.models.fusionsam import param_layout
from fusionsam_jax.training.guards import config_to_dict
from fusionsam_jax.training.logging import progress_bar

log = logging.getLogger(__name__)

FORMAT = "fusionsam_jax.embedding_cache/2"  # 2: the train cache also stores fusion latents
CACHE_DIR = "embedding_cache"
MODEL_KEYS = ("modalities", "scale", "tokenizer_kind", "tokenizer", "fusion", "fmp",
              "fused_decoder", "fused_color", "sam_variant", "sam_overrides", "encoder_dtype",
              "fusion_dtype", "attn_impl", "backbone")


def model_keys(model_cfg) -> tuple[str, ...]:
  """The ``config.model`` entries in the key: `MODEL_KEYS` + the fusion module's options
  entry (`layout.FusionModule.options`)."""
  opts = param_layout(model_cfg).fusion_spec.options
  return MODEL_KEYS + ((opts,) if opts and opts not in MODEL_KEYS else ())


# --------------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------------


def embed_param_names(model_cfg) -> list[str]:
  """The top-level param names the SAM embedding depends on
  (``ParamLayout.embedding_inputs``: the fusion path + the image encoder)."""
  return sorted(param_layout(model_cfg).embedding_inputs)


def hash_params(params: Mapping, names: Iterable[str] | None = None) -> str:
  """blake2b over the path, dtype, shape and bytes of every leaf under `names`."""
  h = hashlib.blake2b(digest_size=16)
  names = sorted(names if names is not None else params)
  for name in names:
    leaves = jax.tree_util.tree_flatten_with_path(params[name])[0]
    for path, leaf in leaves:
      a = np.asarray(jax.device_get(leaf))
      h.update(f"{name}{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}".encode())
      h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def hash_source(source, dataset_dir: str | None = None, split: str | None = None,
                name: str | None = None) -> str:
  """Fingerprint of a split: the prepared files' bytes when `dataset_dir` is given (TFDS
  ``<name>-<split>.*`` files + ``dataset_info.json``), else every element's arrays."""
  h = hashlib.blake2b(digest_size=16)
  if dataset_dir is not None and split is not None and name is not None:
    files = sorted(f for f in os.listdir(dataset_dir) if f.startswith(f"{name}-{split}."))
    if files:
      for f in files + ["dataset_info.json"]:
        p = os.path.join(dataset_dir, f)
        if not os.path.isfile(p):
          continue
        h.update(f.encode())
        with open(p, "rb") as fh:
          for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
      return h.hexdigest()
  h.update(str(len(source)).encode())
  for i in range(len(source)):
    el = source[i]
    for k in sorted(el):
      v = el[k]
      a = np.asarray(v)
      h.update(f"{i}|{k}|{a.dtype}|{a.shape}".encode())
      h.update(a.tobytes() if a.dtype != object else repr(v).encode())
  return h.hexdigest()


def cache_key(config, params: Mapping, data_fingerprint: str, split: str) -> tuple[str, dict]:
  """(hex key, the JSON-able description it hashes)."""
  c = config.train.embedding_cache
  desc = {
      "format": FORMAT,
      "split": split,
      "params": hash_params(params, embed_param_names(config.model)),
      "data": data_fingerprint,
      # (backbone "sam", the default, is left out: keys of runs made before it existed hold)
      "model": {k: config_to_dict(config.model[k]) for k in model_keys(config.model)
                if k in config.model
                and not (k == "backbone" and config.model[k] == "sam")},
      "dtype": str(c.dtype),
  }
  if split == "train":
    desc["views"] = {"num_views": int(c.num_views), "seed": int(c.seed),
                     "crop_size": list(config.train.crop_size),
                     "scale_range": list(config.train.scale_range)}
  else:
    desc["eval"] = {"batch_size": int(config.eval.batch_size),
                    "pad_multiple": int(config.eval.pad_multiple)}
  blob = json.dumps(desc, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16], desc


# --------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------


def make_view(element: Mapping, view: int, *, index: int, crop_size, scale_range, seed: int,
              modalities) -> dict:
  """View `view` of a source element (see the module docstring); uint8 images, uint8 label."""
  el = Standardize(tuple(modalities)).map(dict(element))
  h, w = el["label"].shape[:2]
  ch, cw = int(crop_size[0]), int(crop_size[1])
  if view <= 1:
    params = {"scale": 1.0, "offset": ((h - ch) // 2, (w - cw) // 2), "flip": view == 1}
  else:
    rng = np.random.default_rng([int(seed), int(index), int(view)])
    params = RandomScaleCropFlip((ch, cw), tuple(scale_range)).draw(h, w, rng)
  out = scale_crop_flip(el, crop_size=(ch, cw), **params)
  out["label"] = np.asarray(out["label"]).astype(np.uint8)
  return out


# --------------------------------------------------------------------------------------------
# Cache objects
# --------------------------------------------------------------------------------------------


class TrainCacheSource:
  """Random-access source over a train cache folder (memory-mapped, opened lazily)."""

  def __init__(self, directory: str, modalities):
    self.directory = directory
    self.modalities = tuple(modalities)
    with open(os.path.join(directory, "meta.json")) as f:
      self.meta = json.load(f)
    self._arrays = None

  def _open(self):
    if self._arrays is None:
      keys = list(self.modalities) + ["label", "fusion"] + embedding_names(
          int(self.meta.get("embedding_levels", 1)), "embeddings")
      self._arrays = {k: np.load(os.path.join(self.directory, f"{k}.npy"), mmap_mode="r")
                      for k in keys}
    return self._arrays

  def __len__(self) -> int:
    return int(self.meta["num_examples"])

  def __getitem__(self, i):
    a = self._open()
    out = {k: np.array(a[k][i]) for k in self.modalities}
    out["label"] = np.array(a["label"][i]).astype(np.int32)
    out["image_embeddings"] = join_levels(
        [np.array(a[k][i]) for k in embedding_names(int(self.meta.get("embedding_levels", 1)),
                                                    "embeddings")])
    out["fusion"] = np.array(a["fusion"][i])
    return out

  def __repr__(self) -> str:
    # Stable across processes: grain stores the source's repr in the iterator state and
    # compares it on restore (an object address here made every resume fail).
    return (f"TrainCacheSource({self.meta.get('key', os.path.basename(self.directory))}, "
            f"n={len(self)}, modalities={self.modalities})")

  def __getstate__(self):
    return {"directory": self.directory, "modalities": self.modalities, "meta": self.meta,
            "_arrays": None}


@dataclasses.dataclass
class Cache:
  """A train cache (+ optionally a val cache). `hit`: True when both were found on disk."""
  train_dir: str
  val_dir: str | None
  hit: bool
  train_hit: bool
  val_hit: bool
  modalities: tuple

  def train_source(self) -> TrainCacheSource:
    return TrainCacheSource(self.train_dir, self.modalities)

  def train_loader(self, config, stage: str, seed_offset: int):
    """Shuffled (per-epoch, seeded with ``config.seed + seed_offset``), repeating loader over
    the cached views in batches of `stage`'s size."""
    import grain.python as grain
    src = self.train_source()
    shard = process_shard_options(drop_remainder=True)
    per_process = stage_batch_size(config, stage) // jax.process_count()
    sampler = grain.IndexSampler(num_records=len(src), shard_options=shard, shuffle=True,
                                 num_epochs=None, seed=int(config.seed) + int(seed_offset))
    return grain.DataLoader(data_source=src, sampler=sampler,
                            operations=[grain.Batch(per_process, drop_remainder=True)],
                            worker_count=0, shard_options=shard)

  def val_batches(self):
    """The cached val batches, in eval-loader order (each with ``image_embeddings``)."""
    if self.val_dir is None:
      raise ValueError("no val cache")
    files = sorted(f for f in os.listdir(self.val_dir) if f.startswith("batch_"))
    for f in files:
      with np.load(os.path.join(self.val_dir, f)) as z:
        b = {k: z[k] for k in z.files}
      names = [k for k in embedding_names(len(b), "image_embeddings") if k in b]
      b["image_embeddings"] = join_levels([b.pop(k) for k in names])
      yield b


def cache_damage(directory: str, kind: str) -> str | None:
  """Why a finished cache folder cannot be used (None: it can): an unreadable ``meta.json``,
  or for val a batch count other than the one it records (a deleted or half-copied batch
  would silently change val mIoU)."""
  try:
    with open(os.path.join(directory, "meta.json")) as f:
      meta = json.load(f)
  except FileNotFoundError:
    return "no meta.json"
  except (OSError, ValueError) as e:
    return f"meta.json unreadable: {e}"
  if kind == "val":
    have = len([f for f in os.listdir(directory) if f.startswith("batch_")
                and f.endswith(".npz")])
    want = meta.get("num_batches") if isinstance(meta, dict) else None
    if have != want:
      return f"{have} batch files, meta.json records {want}"
  return None


def embedding_names(levels: int, base: str) -> list[str]:
  """Stored names of the embedding levels: `base`, `base`_1, ... (SAM: one level; a SAM 2
  backbone: image_embed, high_res_0, high_res_1)."""
  return [base] + [f"{base}_{i}" for i in range(1, levels)]


def join_levels(levels: list):
  """One level -> the array (SAM); several -> the tuple the model takes (SAM 2)."""
  return levels[0] if len(levels) == 1 else tuple(levels)


class NpyWriter:
  """Writes an ``.npy`` file of a known shape block by block with ordinary file writes (a
  full disk raises ``OSError(ENOSPC)`` at the write; stores through a memory map would
  crash the process with SIGBUS instead)."""

  def __init__(self, path: str, dtype, shape: tuple):
    self.path, self.dtype, self.shape = path, np.dtype(dtype), tuple(int(d) for d in shape)
    self.rows = 0
    self._f = open(path, "wb")
    np.lib.format.write_array_header_2_0(self._f, {
        "descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
        "shape": self.shape})

  def append(self, block: np.ndarray) -> None:
    block = np.ascontiguousarray(np.asarray(block).astype(self.dtype, copy=False))
    if block.shape[1:] != self.shape[1:] or self.rows + len(block) > self.shape[0]:
      raise ValueError(f"{self.path}: block {block.shape} does not fit {self.shape} at row "
                       f"{self.rows}")
    self._f.write(block.tobytes())
    self.rows += len(block)

  def close(self) -> None:
    if self._f.closed:
      return
    try:
      if self.rows != self.shape[0]:
        raise ValueError(f"{self.path}: {self.rows} of {self.shape[0]} rows written")
      self._f.flush()
      os.fsync(self._f.fileno())
    finally:
      self._f.close()


def check_free_space(directory: str, needed: int, what: str) -> None:
  """Raises ``OSError(ENOSPC)`` (the sizes in its message) when `directory`'s file system has
  less than `needed` bytes free."""
  free = shutil.disk_usage(directory).free
  if needed > free:
    raise OSError(errno.ENOSPC, f"No space left on device: the {what} embedding cache needs "
                  f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free", directory)


def _finish_dir(tmp: str, final: str, root: str, split: str) -> None:
  if jax.process_index() == 0:
    if os.path.exists(final):
      shutil.rmtree(final)
    os.replace(tmp, final)
    for d in os.listdir(root):
      p = os.path.join(root, d)
      if d.startswith(f"{split}-") and p != final and os.path.isdir(p):
        shutil.rmtree(p, ignore_errors=True)


def _tmp_dir(root: str, split: str) -> str:
  os.makedirs(root, exist_ok=True)
  return tempfile.mkdtemp(prefix=f".{split}-", dir=root)


def _embed_jit(model, mesh):
  fn = cache_fn(model)
  return jax.jit(lambda p, b: jax.tree.map(lambda x: x.astype(jnp.float32), fn(p, b)),
                 in_shardings=(T.replicated(mesh), T.data_sharding(mesh)),
                 out_shardings=T.replicated(mesh))


def build_train_cache(directory: str, config, params, source, embed, mesh, desc: dict,
                      progress: bool = True) -> None:
  """Computes every view's embedding and writes the train cache folder at `directory`."""
  c = config.train.embedding_cache
  mods = tuple(config.model.modalities)
  n_src, n_views = len(source), int(c.num_views)
  n = n_src * n_views
  bs = max(int(config.eval.batch_size), mesh.size)
  bs = -(-bs // mesh.size) * mesh.size
  arrays = None
  pbar = None
  if progress and jax.process_index() == 0:
    pbar = progress_bar(total=n, desc="embedding cache (train)", unit="view", dynamic_ncols=True)
  order = [(i, v) for i in range(n_src) for v in range(n_views)]
  t0, first_s = time.perf_counter(), None
  for start in range(0, n, bs):
    chunk = order[start:start + bs]
    views = [make_view(source[i], v, index=i, crop_size=config.train.crop_size,
                       scale_range=config.train.scale_range, seed=int(c.seed), modalities=mods)
             for i, v in chunk]
    batch = {k: np.stack([x[k] for x in views]) for k in mods + ("label",)}
    pad = bs - len(chunk)
    if pad:
      batch = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in batch.items()}
    out = jax.device_get(embed(params, T.shard_batch({k: batch[k] for k in mods}, mesh)))
    levels = [np.asarray(x)[:len(chunk)] for x in jax.tree.leaves(out["image_embeddings"])]
    emb = dict(zip(embedding_names(len(levels), "embeddings"), levels))
    emb["fusion"] = np.asarray(out["fusion"])[:len(chunk)]
    if arrays is None:
      shapes = {k: (np.uint8, batch[k].shape[1:]) for k in mods + ("label",)}
      shapes.update({k: (np.dtype(str(c.dtype)), v.shape[1:]) for k, v in emb.items()})
      check_free_space(directory, n * sum(np.dtype(dt).itemsize * int(np.prod(sh))
                                           for dt, sh in shapes.values()), "train")
      arrays = {k: NpyWriter(os.path.join(directory, f"{k}.npy"), dt, (n,) + sh)
                for k, (dt, sh) in shapes.items()}
    for k in mods + ("label",):
      arrays[k].append(batch[k][:len(chunk)])
    for k, v in emb.items():
      arrays[k].append(v)
    if first_s is None:
      first_s = time.perf_counter() - t0     # the first batch compiles
    if pbar is not None:
      pbar.update(len(chunk))
  if pbar is not None:
    pbar.close()
  for a in (arrays or {}).values():
    a.close()
  del arrays
  meta = dict(desc, num_examples=n, num_source=n_src, num_views=n_views, time=time.time(),
              embedding_levels=len(levels) if n else 1,
              build_s=time.perf_counter() - t0, first_batch_s=first_s, batch_size=bs)
  with open(os.path.join(directory, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)


def build_val_cache(directory: str, config, params, val_source, embed, mesh, desc: dict) -> None:
  i, t0, first_s = 0, time.perf_counter(), None
  for batch in eval_iterable(config, val_source):
    b = strip_batch(batch)
    mods = tuple(config.model.modalities)
    emb = jax.device_get(embed(params, T.shard_batch({k: b[k] for k in mods},
                                                     mesh))["image_embeddings"])
    levels = jax.tree.leaves(emb)
    for k, v in zip(embedding_names(len(levels), "image_embeddings"), levels):
      b[k] = np.asarray(v).astype(np.dtype(str(config.train.embedding_cache.dtype)))
    np.savez(os.path.join(directory, f"batch_{i:05d}.npz"), **b)
    i += 1
    if first_s is None:
      first_s = time.perf_counter() - t0     # the first batch compiles
  with open(os.path.join(directory, "meta.json"), "w") as f:
    json.dump(dict(desc, num_batches=i, num_examples=len(val_source), time=time.time(),
                   build_s=time.perf_counter() - t0, first_batch_s=first_s), f, indent=1)


def cache_enabled(config) -> tuple[bool, str]:
  c = config.train.get("embedding_cache")
  if c is None or not c.enabled:
    return False, "train.embedding_cache.enabled is False"
  if not config.model.freeze_fmp_in_segmentation:
    return False, ("model.freeze_fmp_in_segmentation is False: the fusion module trains in "
                   "the segmentation stage, so embeddings change every step")
  if int(c.num_views) < 1:
    return False, "train.embedding_cache.num_views < 1"
  return True, ""


def maybe_build(config, workdir: str, model, params, spec, mesh, val_source,
                *, progress: bool = True, say: Callable[[str], None] | None = None
                ) -> Cache | None:
  """Returns the segmentation stage's cache (built if needed), or None when it is off.

  `spec` is a `data.spec.DataSpec` (in-memory sources: `build_for_sources`)."""
  train_source = spec.source("train")
  ddir = dataset_dir(spec.name, spec.data_dir)
  return build_for_sources(config, workdir, model, params, mesh,
                           train_source, val_source,
                           train_fp=hash_source(train_source, ddir, "train", spec.name),
                           val_fp=hash_source(val_source, ddir, config.eval.val_split,
                                              spec.name),
                           progress=progress, say=say)


def build_for_sources(config, workdir, model, params, mesh, train_source, val_source, *,
                      train_fp: str | None = None, val_fp: str | None = None,
                      progress: bool = True, say: Callable[[str], None] | None = None
                      ) -> Cache | None:
  say = say or (lambda m: print(m, flush=True) if jax.process_index() == 0 else None)
  ok, why = cache_enabled(config)
  if not ok:
    say(f"Embedding cache off ({why}); the segmentation stage runs the SAM encoder every step "
        "on augmented inputs.")
    return None
  root = os.path.join(os.fspath(workdir), CACHE_DIR)
  t0 = time.perf_counter()
  embed = None
  dirs, hits = {}, {}
  sources = {"train": (train_source, train_fp)}
  if val_source is not None:
    sources[str(config.eval.val_split)] = (val_source, val_fp)
  for split, (src, fp) in sources.items():
    fp = fp or hash_source(src)
    kind = "train" if split == "train" else "val"
    key, desc = cache_key(config, params, fp, kind)
    final = os.path.join(root, f"{kind}-{key}")
    dirs[kind] = final
    damage = cache_damage(final, kind) if os.path.isdir(final) else None
    if os.path.isfile(os.path.join(final, "meta.json")) and damage is None:
      hits[kind] = True
      continue
    if damage is not None:
      say(f"Embedding cache ({kind}) at {final} is damaged ({damage}): it is built again")
      if jax.process_index() == 0:
        shutil.rmtree(final, ignore_errors=True)
    hits[kind] = False
    stale = [d for d in (os.listdir(root) if os.path.isdir(root) else [])
             if d.startswith(f"{kind}-")]
    say(f"Embedding cache ({kind}): {'rebuilding, inputs changed' if stale else 'building'} "
        f"({len(src)} images{' x %d views' % int(config.train.embedding_cache.num_views) if kind == 'train' else ''}) in {final}")
    embed = embed or _embed_jit(model, mesh)
    tmp = _tmp_dir(root, kind)
    try:
      if kind == "train":
        build_train_cache(tmp, config, params, src, embed, mesh, desc, progress=progress)
      else:
        build_val_cache(tmp, config, params, src, embed, mesh, desc)
      _finish_dir(tmp, final, root, kind)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  if all(hits.values()):
    say(f"Embedding cache: reusing {', '.join(dirs.values())}")
  else:
    say(f"Embedding cache ready ({time.perf_counter() - t0:.1f} s)")
  return Cache(dirs["train"], dirs.get("val"), all(hits.values()), hits["train"],
               hits.get("val", False), tuple(config.model.modalities))
