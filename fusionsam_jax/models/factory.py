"""Building FusionSAM from a config: the SAM size, the module, its params.

    model = build_model(config)
    params = init_params(config, model)          # random init + converted SAM weights
    shapes = abstract_params(config, model)      # jax.ShapeDtypeStruct leaves, no compute
"""

from __future__ import annotations

import os
from typing import Any

import jax

from fusionsam_jax.errors import SamWeightsMissingError
from fusionsam_jax.models import fusionsam
from fusionsam_jax.models.fusionsam import sam2_backbone_config, sam_heads_config
from fusionsam_jax.models.sam.checkpoint import META_FILE as SAM_META_FILE
from fusionsam_jax.models.sam.sam import SAM_PRESETS
from fusionsam_jax.models.sam2.checkpoint import META_FILE as SAM2_META_FILE

PyTree = Any


def sam_config(config):
  """The SAM size: the preset ``model.sam_variant`` with ``model.sam_overrides`` applied.
  Overrides change the architecture, so they are refused together with converted weights."""
  m = config.model
  if backbone(config) != "sam":
    return sam_heads_config(sam2_backbone_config(backbone(config)))
  if m.sam_variant not in SAM_PRESETS:
    raise ValueError(f"model.sam_variant {m.sam_variant!r}: expected one of {sorted(SAM_PRESETS)}")
  cfg = SAM_PRESETS[m.sam_variant]
  overrides = dict(m.get("sam_overrides") or {})
  if overrides:
    if m.sam_checkpoint:
      raise ValueError(f"model.sam_overrides {overrides} change SAM's architecture; they "
                       "cannot be combined with converted SAM weights (model.sam_checkpoint)")
    unknown = sorted(set(overrides) - set(cfg.to_dict()))
    if unknown:
      raise ValueError(f"model.sam_overrides: unknown SamConfig field(s) {unknown}")
    cfg = type(cfg).from_dict({**cfg.to_dict(), **overrides})
  return cfg


def backbone(config) -> str:
  """``model.backbone``: "sam" (SAM's ViT of ``model.sam_variant``; the default, also for
  configs saved before the option existed) or "sam2_<preset>" (e.g. "sam2_hiera_l")."""
  return config.model.get("backbone", "sam") or "sam"


def build_model(config):
  return fusionsam.build_model(config.model, sam_config=sam_config(config))


def sam_weights_path(config) -> str | None:
  """The converted SAM checkpoint directory of the config (None: random SAM allowed).
  Raises `SamWeightsMissingError` with the conversion command when it is missing. With a
  SAM 2 backbone: ``model.sam2_checkpoint`` (`sam2_weights_path`)."""
  m = config.model
  if backbone(config) != "sam":
    return sam2_weights_path(config)
  path = m.sam_checkpoint
  if not path:
    if not m.allow_random_sam:
      raise SamWeightsMissingError(
          "model.sam_checkpoint is not set and model.allow_random_sam is False; convert the "
          f"official {m.sam_variant} weights once (`python tools/convert_sam_weights.py "
          f"--checkpoint sam_{m.sam_variant}_XXXX.pth --output ckpt/sam_{m.sam_variant}`) and "
          f"pass --config.model.sam_checkpoint=ckpt/sam_{m.sam_variant}")
    return None
  if not os.path.isfile(os.path.join(path, SAM_META_FILE)):
    what = "does not exist" if not os.path.exists(path) else f"has no {SAM_META_FILE}"
    raise SamWeightsMissingError(
        f"converted SAM weights {path!r} {what}; download the official checkpoint "
        "(sam_vit_h_4b8939.pth for vit_h) and convert it once: `python "
        f"tools/convert_sam_weights.py --checkpoint sam_vit_h_4b8939.pth --output {path}`")
  return path


def sam2_weights_path(config) -> str | None:
  """``model.sam2_checkpoint`` of a SAM 2 backbone (None: random, if allowed)."""
  m = config.model
  path = m.get("sam2_checkpoint")
  name = backbone(config)[len("sam2_"):]
  if not path:
    if not m.allow_random_sam:
      raise SamWeightsMissingError(
          f"model.backbone={backbone(config)!r} but model.sam2_checkpoint is not set and "
          "model.allow_random_sam is False; convert the official weights once (`python "
          f"tools/convert_sam2_weights.py --checkpoint sam2.1_{name}.pt --output "
          f"ckpt/sam2.1_{name}`) and pass --config.model.sam2_checkpoint=ckpt/sam2.1_{name}")
    return None
  if not os.path.isfile(os.path.join(path, SAM2_META_FILE)):
    what = "does not exist" if not os.path.exists(path) else f"has no {SAM2_META_FILE}"
    raise SamWeightsMissingError(
        f"converted SAM 2 weights {path!r} (model.sam2_checkpoint) {what}; convert the "
        f"official checkpoint once: `python tools/convert_sam2_weights.py --checkpoint "
        f"sam2.1_{name}.pt --output {path}`")
  return path


def init_params(config, model, *, load_sam: bool = True) -> PyTree:
  """Random init of the whole tree (seeded by ``config.seed``), then the converted SAM
  weights when configured (the encoder is then never drawn at random)."""
  path = sam_weights_path(config) if load_sam else None
  params = fusionsam.init_params(model, jax.random.PRNGKey(int(config.seed)),
                                 tuple(config.train.crop_size),
                                 image_encoder="random" if path is None else "abstract")
  if path is not None:
    params = fusionsam.load_sam_weights(params, path, config.model)
  return params


def abstract_params(config, model) -> PyTree:
  """The param tree's shapes and dtypes (`jax.ShapeDtypeStruct` leaves)."""
  return jax.eval_shape(lambda: fusionsam.init_params(model, jax.random.PRNGKey(0),
                                                      tuple(config.train.crop_size)))
