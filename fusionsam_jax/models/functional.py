"""Pure functions of (params, batch) over FusionSAM that training, caching, evaluation and
prediction share. Batches are dicts of uint8 images ``{m: (B, H, W, C_m)}`` (+ ``label``).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import jax
import jax.numpy as jnp

from fusionsam_jax.models.fusionsam import FusionSAM
from fusionsam_jax.models.precision import cast_floating

def inputs_from_batch(batch: Mapping[str, Any], modalities) -> Dict[str, jax.Array]:
  """uint8 images -> float32 in [0, 1], one entry per modality."""
  return {m: jnp.asarray(batch[m]).astype(jnp.float32) / 255.0 for m in modalities}


def latents(model: FusionSAM, params, images):
  """Quantised latents per modality ``{m: (B, h, w, d_c)}`` (straight-through gradients)."""
  return model.apply({"params": params}, images, method=FusionSAM.tokenize)


def cast_fusion_path(model: FusionSAM, params, dtype):
  """`params` with the float leaves of the fusion path (``model.layout.fusion_path``:
  everything upstream of the SAM image encoder) in `dtype` (`precision.cast_floating`: the
  codebooks stay float32); the other top-level params unchanged. `params` may hold a part
  of the model's top-level params."""
  path = set(model.layout.fusion_path)
  return {k: (cast_floating(v, dtype) if k in path else v) for k, v in params.items()}


def fusion_forward(model: FusionSAM, params, images, dtype="float32", *,
                   train_tokenizers: bool = True, with_vq: bool = False):
  """Tokenizers -> fusion -> fused decoder computed in `dtype` over the (float32) params,
  which are cast on the way in, so gradients reach them in float32 (`models.precision`).

  images: ``{m: (B, H, W, C_m)}`` float32 in [0, 1]. Returns float32 dict(fusion (B, h, w,
  d_c), fused (B, H, W, 3)) and, with `with_vq`, ``vq``: ``{m: Eq. 6 term ()}``.
  `train_tokenizers` False: the latents are under stop-gradient.
  """
  dt = jnp.dtype(dtype)
  p = cast_fusion_path(model, params, dt)
  xs = {m: x.astype(dt) for m, x in images.items()}
  if with_vq:
    z, vq = model.apply({"params": p}, xs, method=FusionSAM.tokenize_vq)
  else:
    z, vq = latents(model, p, xs), None
  if not train_tokenizers:
    z = jax.lax.stop_gradient(z)
  # The float32 images: the fused image's chroma comes from the RGB input (FusionSAM.fuse).
  out = model.apply({"params": p}, z, images, method=FusionSAM.fuse)
  out = {k: v.astype(jnp.float32) for k, v in out.items()}
  if with_vq:
    out["vq"] = {m: v.astype(jnp.float32) for m, v in vq.items()}
  return out


def fuse(model: FusionSAM, params, images, *, train_tokenizers: bool = False):
  """dict(fusion (B, h, w, d_c), fused (B, H, W, 3)) with gradients into FMP and the fused
  decoder (and, with `train_tokenizers`, into the tokenizers through the straight-through
  quantiser), computed in ``model.train_dtype`` (`fusion_forward`)."""
  return fusion_forward(model, params, images, model.train_dtype,
                        train_tokenizers=train_tokenizers)


def frozen_fusion(model: FusionSAM, params, images):
  """Tokenizers -> fusion -> fused decoder, forward only, computed in `model.fusion_dtype`.

  With ``fusion_dtype="bfloat16"`` the path's params (but the codebooks) and inputs are cast
  to bf16 (GroupNorm / LayerNorm statistics and the codebook search stay float32); outputs
  come back float32, under stop-gradient: dict(fusion (B, h, w, d_c), fused (B, H, W, 3)).
  """
  return jax.lax.stop_gradient(fusion_forward(model, params, images, model.fusion_dtype))


def image_embeddings(model: FusionSAM, params, fused):
  """SAM image embeddings (B, e, e, C) of the fused image (a SAM 2 backbone: the tuple of
  its three levels, `FusionSAM.image_embeddings`). The encoder is frozen (its params
  are never trained); its input is under stop-gradient unless ``model.train_sam_encoder``,
  which lets f_s backpropagate through it into the fusion path."""
  return model.apply({"params": params}, fused, method=FusionSAM.image_embeddings)


def cache_fn(model: FusionSAM):
  """fn(params, batch) -> dict(image_embeddings (B, e, e, C), fusion (B, h, w, d_c)): what
  the embedding cache stores for a view while the fusion path is frozen."""
  mods = model.modalities

  def fn(params, batch):
    fz = frozen_fusion(model, params, inputs_from_batch(batch, mods))
    return dict(image_embeddings=image_embeddings(model, params, fz["fused"]),
                fusion=fz["fusion"])

  return fn


def predict_fn(model: FusionSAM):
  """fn(params, batch) -> dict(logits (B,H,W,K), pred (B,H,W) int32, fused (B,H,W,3),
  probs (B,H,W,K)). Uses ``batch["image_embeddings"]`` when present."""
  mods = model.modalities

  def fn(params, batch):
    images = inputs_from_batch(batch, mods)
    emb = batch.get("image_embeddings") if hasattr(batch, "get") else None
    fz = frozen_fusion(model, params, images)
    if emb is None:
      emb = image_embeddings(model, params, fz["fused"])
    hw = images[mods[0]].shape[1:3]
    emb = jax.tree.map(lambda x: x.astype(jnp.float32), emb)
    logits = model.apply({"params": params}, fz["fusion"], emb, hw,
                         method=FusionSAM.segment)["logits"]
    return dict(logits=logits, pred=jnp.argmax(logits, -1).astype(jnp.int32),
                probs=jax.nn.softmax(logits, -1), fused=fz["fused"])

  return fn
