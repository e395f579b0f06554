"""Full-resolution evaluation: one confusion matrix over a split (RTFNet / CMX convention:
unlabeled counted as a class, 255 ignored, nearest-neighbour labels), plus the SOD metrics
(S / E / F-measure, MAE as PySODMetrics) for saliency.

    ev = Evaluator(model, config, mesh)
    result = ev.run(params, eval_iterable(config, source))   # {"cm", "num_images", "sod"?}
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import jax
import numpy as np

from fusionsam_jax.data.datasets import get as get_info
from fusionsam_jax.data.spec import strip_batch
from fusionsam_jax.metrics.miou import confusion_matrix, ConfusionMatrix
from fusionsam_jax.metrics.sod import SODMetrics
from fusionsam_jax.models.functional import predict_fn
from fusionsam_jax.training import mesh as mesh_lib
from fusionsam_jax.training.logging import progress_bar


class Evaluator:
  """A jitted eval step ``(params, batch) -> {"cm", "pred", "fused", "prob"?}`` on the mesh
  (batch sharded) and the loop that accumulates it."""

  def __init__(self, model, config, mesh):
    self.mesh = mesh
    self.num_classes = int(config.model.num_classes)
    self.saliency = config.model.task == "saliency"
    predict = predict_fn(model)
    k, saliency = self.num_classes, self.saliency

    def step(params, batch):
      out = predict(params, batch)
      res = {"cm": confusion_matrix(out["pred"], batch["label"], k, 255, valid=batch["valid"]),
             "pred": out["pred"], "fused": out["fused"]}
      if saliency:
        res["prob"] = out["probs"][..., 1]
      return res

    repl = mesh_lib.replicated(mesh)
    self.step = jax.jit(step, in_shardings=(repl, mesh_lib.data_sharding(mesh)),
                        out_shardings=repl)

  def run(self, params, batches: Iterable[Mapping], *, max_batches: int | None = None,
          on_batch: Callable | None = None, progress: str | None = None,
          total: int | None = None) -> dict:
    """Accumulates over `batches` (eval-loader batches with ``valid`` masks). `progress`: a
    bar with that description (rate and ETA from `total`, the number of batches)."""
    cm = ConfusionMatrix(self.num_classes, ignore_index=255)
    sod = None
    if self.saliency:
      sod = SODMetrics()
    n_images = 0
    params = jax.device_put(params, mesh_lib.replicated(self.mesh))
    if progress and jax.process_index() == 0:
      batches = progress_bar(batches, desc=progress, unit="batch", dynamic_ncols=True,
                             leave=False, total=total)
    for i, batch in enumerate(batches):
      if max_batches is not None and i >= max_batches:
        break
      local = strip_batch(batch)
      out = self.step(params, mesh_lib.shard_batch(local, self.mesh))
      cm.add(np.asarray(jax.device_get(out["cm"])))
      valid = np.asarray(local["valid"])
      n_images += int(valid.reshape(valid.shape[0], -1).any(1).sum())
      if sod is None and on_batch is None:
        continue
      host = {k: np.asarray(jax.device_get(v)) for k, v in out.items() if k != "cm"}
      if sod is not None:
        labels = np.asarray(local["label"])
        for j in range(valid.shape[0]):
          rows, cols = valid[j].any(1).sum(), valid[j].any(0).sum()
          if rows == 0:
            continue
          # As the field does: the map is saved as an 8-bit PNG, then evaluated.
          pm = np.round(np.clip(host["prob"][j, :rows, :cols], 0, 1) * 255).astype(np.uint8)
          sod.update(pm, (labels[j, :rows, :cols] == 1).astype(np.uint8) * 255)
      if on_batch is not None:
        on_batch(batch, host)
    out = {"cm": cm, "num_images": n_images}
    if sod is not None:
      out["sod"] = sod.results(curves=False) if sod.count else {}
    return out

  def val_metrics(self, params, batches) -> dict:
    """What training logs and ranks checkpoints by: ``val_miou``, ``val_pixel_acc``."""
    cm = self.run(params, batches)["cm"]
    return {"val_miou": cm.miou(), "val_pixel_acc": cm.pixel_accuracy()}


def summary(result: dict, class_names, **extra) -> dict:
  """JSON-able summary of `Evaluator.run`'s result (per-class IoU, confusion matrix, ...)."""
  out = result["cm"].summary(list(class_names))
  out.update(num_images=result["num_images"], **extra)
  if "sod" in result:
    out["sod"] = {k: float(v) for k, v in result["sod"].items()}
  return out


def image_tiles(config, batch, evaluator: Evaluator) -> Callable:
  """TensorBoard images ``fn(params) -> {name: (N, H, W', 3)}``: inputs | fused |
  prediction | ground truth for the first two examples of an eval batch.

  The whole eval `batch` goes through `evaluator`'s jitted eval step, which the final
  evaluation compiles anyway for batches of this shape (one compilation fewer than a
  separate batch-of-two predict: ~7 s for the tiny demo on 2 CPU cores)."""
  info = get_info(config.dataset)
  full = strip_batch(batch)
  local = {k: np.asarray(v)[:2] for k, v in full.items()}
  sharded = mesh_lib.shard_batch(full, evaluator.mesh)      # placed once, reused every call

  def predict(params):
    params = jax.device_put(params, mesh_lib.replicated(evaluator.mesh))
    out = evaluator.step(params, sharded)
    return {k: out[k][:2] for k in ("pred", "fused")}

  def fn(params):
    out = jax.device_get(predict(params))
    tiles = []
    for m in config.model.modalities:
      x = local[m]
      tiles.append(np.repeat(x, 3, -1) if x.shape[-1] == 1 else x)
    tiles.append(np.round(np.clip(np.asarray(out["fused"]), 0, 1) * 255).astype(np.uint8))
    pred = np.asarray(out["pred"])
    tiles.append(info.colorize(pred) if config.model.task == "semantic"
                 else np.repeat((pred[..., None] * 255).astype(np.uint8), 3, -1))
    tiles.append(info.colorize(np.where(local["label"] == 255, 0, local["label"])))
    return {"inputs|fused|pred|truth": np.concatenate(tiles, axis=2)}

  return fn
