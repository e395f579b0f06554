"""Where a config's data lives and the iterators the stages and evaluators read.

    spec = ensure_data(config)              # generates + prepares a generated set on first use
    it = train_iterator(config, spec, "fusion", seed_offset=2)
    for batch in eval_iterable(config, spec.source("val")): ...

Durations: a stage runs ``num_epochs`` passes over the prepared train split unless
``num_steps`` is set; `stage_steps` turns epochs into steps from the split's real size at run
time, so ``--config.train.batch_size=8`` keeps the number of epochs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Mapping

import jax
from jax.experimental import multihost_utils

from fusionsam_jax import locking
from fusionsam_jax.data import datasets, generate, paths, prepare
from fusionsam_jax.data.paths import dataset_dir
from fusionsam_jax.data.pipeline import eval_loader, train_loader
from fusionsam_jax.data.pipeline import num_eval_batches as pipeline_num_eval_batches
from fusionsam_jax.data.sources import load_source
from fusionsam_jax.errors import DataMissingError


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """name: the dataset's registry key (``datasets.get(name)``: "mfnet", ...,
  ``custom:<folder>``); data_dir: root holding ``<short name>/<version>`` (prepared);
  generated: a generated scene set (made by this package)."""
  name: str
  data_dir: str
  generated: bool

  def source(self, split: str):
    return load_source(self.name, split, self.data_dir)

  @property
  def dataset_dir(self) -> str:
    return dataset_dir(self.name, self.data_dir)

  def split_size(self, split: str) -> int:
    return len(self.source(split))


def _generate_sig(config) -> tuple[str, tuple[int, int]]:
  g = config.generate
  h = g.height if g.height is not None else config.train.crop_size[0]
  w = g.width if g.width is not None else config.train.crop_size[1]
  return f"{datasets.get(config.dataset).name}-n{g.num}-s{g.seed}-{h}x{w}", (int(h), int(w))


def data_spec(config) -> DataSpec:
  """Where the config's dataset lives (does not check that it exists)."""
  name = datasets.get(config.dataset).key
  if config.get("generate") is not None:
    sig, _ = _generate_sig(config)
    return DataSpec(name, os.path.join(os.fspath(config.data_dir), "generated", sig), True)
  return DataSpec(name, os.fspath(config.data_dir), False)


def ensure_data(config, *, say: Callable[[str], None] = print) -> DataSpec:
  """The dataset's `DataSpec`; a generated set is generated + prepared when absent.

  Raises `DataMissingError` (naming the prepare command) for a real dataset that has not
  been prepared.
  """
  spec = data_spec(config)
  if paths.is_prepared(spec.name, spec.data_dir):
    return spec
  if not spec.generated:
    ds = datasets.get(spec.name)
    raise DataMissingError(
        f"dataset '{ds.name}' is not prepared under data_dir={spec.data_dir!r} "
        f"(expected {spec.dataset_dir}/dataset_info.json). Get {ds.source}, then run "
        f"`{ds.prepare_command(spec.data_dir)}`, or point "
        "--config.data_dir at the folder you prepared it in.")
  _, (h, w) = _generate_sig(config)
  raw = os.path.join(spec.data_dir, "raw")
  g = config.generate
  t0 = time.perf_counter()
  if jax.process_index() == 0:
    os.makedirs(spec.data_dir, exist_ok=True)
    # One maker at a time (runs in other workdirs may want the same set); under the lock,
    # the temporary folders of a killed maker are orphans.
    with locking.DirLock(spec.data_dir, what="generated data folder", say=say, wait=True):
      if not paths.is_prepared(spec.name, spec.data_dir):  # (made while we waited)
        short = datasets.get(spec.name).name
        locking.remove_orphans(spec.data_dir, (
            lambda n: n.startswith((".raw-generating-", f".{short}-building-")),),
            say=say)
        say(f"Generating {g.num} {short}-layout scenes ({h}x{w}, seed {g.seed}) in {raw}")
        generate.generate_dataset(spec.name, raw, int(g.num), int(g.seed), h, w,
                                  overwrite=True, progress=False)
        prepare.prepare_dataset(spec.name, raw, spec.data_dir, if_exists="overwrite",
                                progress=False)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("fusionsam_generate")
  say(f"Prepared the generated set at {spec.dataset_dir} ({time.perf_counter() - t0:.1f} s)")
  return spec


def strip_batch(batch: Mapping[str, Any]) -> dict:
  """The numeric part of a loader batch (drops ``name``), ready for `shard_batch`."""
  return {k: v for k, v in batch.items() if k != "name"}


def stage_batch_size(config, stage: str) -> int:
  """Global batch of a stage: ``train.stages.<stage>.batch_size`` if set, else
  ``train.batch_size``."""
  b = config.train.stages[stage].get("batch_size")
  return int(b if b else config.train.batch_size)


def stage_crop_size(config, stage: str) -> tuple[int, int]:
  """Training crop of a stage: ``train.stages.<stage>.crop_size`` if set, else
  ``train.crop_size``."""
  c = config.train.stages[stage].get("crop_size")
  return tuple(int(x) for x in (c if c else config.train.crop_size))


def steps_per_epoch(train_size: int, batch_size: int) -> int:
  """Batches per pass over `train_size` examples (the last partial batch is dropped)."""
  return max(1, int(train_size) // int(batch_size))


def stage_steps(config, stage: str, train_size: int) -> int:
  """A stage's optimizer steps: ``num_steps`` when set, else ``num_epochs`` passes over a
  train split of `train_size` examples at the stage's batch size."""
  sc = config.train.stages[stage]
  if sc.get("num_steps") is not None:
    return int(sc.num_steps)
  per = steps_per_epoch(train_size, stage_batch_size(config, stage))
  return int(math.ceil(per * float(sc.get("num_epochs", 0.0))))


def eval_every_steps(config, train_size: int) -> int:
  """Validation cadence in steps: ``train.eval_every`` when set, else
  ``train.eval_every_epochs`` of the segmentation stage."""
  t = config.train
  if t.get("eval_every") is not None:
    return int(t.eval_every)
  per = steps_per_epoch(train_size, stage_batch_size(config, "segmentation"))
  return int(math.ceil(per * float(t.get("eval_every_epochs", 5))))


def host_cpus() -> int:
  """CPU cores this process may use (its affinity mask where the OS has one)."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


def worker_count(config, cpus: int | None = None) -> int:
  """grain worker processes of the training loader: ``train.worker_count`` when set, else
  sized to the host: none on <= 2 cores (the loop's own thread and XLA need them; on the
  2-core CI box 2 workers were slower than the in-process loader,
  benchmarks/results/input_pipeline_cpu.json), else half the cores, at most 8 (each worker
  reads + augments ~90 MFNet pairs/s on one core; a batch-4 step at 30 ms takes ~130)."""
  v = config.train.get("worker_count")
  if v is not None:
    return int(v)
  cpus = host_cpus() if cpus is None else int(cpus)
  return 0 if cpus <= 2 else min(8, cpus // 2)


def device_prefetch(config, cpus: int | None = None) -> int:
  """Batches the loop keeps placed on the devices ahead of the step: ``train.
  device_prefetch`` when set, else 2 with the in-process loader and one per grain worker
  (at most 8) with workers, so a burst of slow augmentations is absorbed."""
  v = config.train.get("device_prefetch")
  if v is not None:
    return max(1, int(v))
  return max(2, min(8, worker_count(config, cpus)))


def train_iterator(config, spec: DataSpec, stage: str, seed_offset: int):
  """An endless, shuffled, augmented iterator over the train split at the stage's batch and
  crop size (per-process batch), shuffled with ``config.seed + seed_offset`` (the stage's
  `StageSpec.rng_offset`); has grain's `get_state` / `set_state`."""
  per_process = stage_batch_size(config, stage) // jax.process_count()
  loader = train_loader(
      spec.source("train"), batch_size=per_process, crop_size=stage_crop_size(config, stage),
      scale_range=tuple(config.train.scale_range), flip_prob=float(config.train.flip_prob),
      seed=int(config.seed) + int(seed_offset),
      worker_count=worker_count(config), modalities=tuple(config.model.modalities))
  return iter(loader)


def num_eval_batches(config, num_examples: int, *, batch_size: int | None = None) -> int:
  """Batches per process that `eval_iterable` yields for `num_examples` examples."""
  bs = int(batch_size or config.eval.batch_size)
  return pipeline_num_eval_batches(num_examples, max(1, bs // jax.process_count()),
                                   jax.process_count())


def eval_iterable(config, source, *, batch_size: int | None = None):
  """A fresh eval loader over `source` (full resolution, padding, ``valid`` masks)."""
  bs = int(batch_size or config.eval.batch_size)
  per_process = max(1, bs // jax.process_count())
  return eval_loader(source, batch_size=per_process, pad_multiple=int(config.eval.pad_multiple),
                     modalities=tuple(config.model.modalities))
