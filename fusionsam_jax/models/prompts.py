"""Prompts made from the fusion representation (FusionSAM Fig. 2). No ground truth enters.

- Dense prompt: the fusion representation placed in SAM's mask-input frame, then SAM's
  `mask_downscaling` stack (whose first conv takes d_c channels instead of 1).
- Sparse prompt: `FusionPointPromptEncoder` scores every latent position with a learned
  saliency head, keeps the top-k, and encodes each point as SAM encodes a positive point
  (random-Fourier PE + the foreground point embedding) plus a projection of the fusion
  feature at that position, scaled by its (differentiable) saliency.
"""

from typing import Callable, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp


def dense_prompt_input(fusion, content_hw: Tuple[int, int], mask_size: int):
  """Places the fusion map (B, h, w, d_c) in SAM's (mask_size, mask_size) mask-input frame.

  SAM's input frame holds the resized image in its top-left (content_hw pixels of the
  img_size x img_size canvas); the mask input covers that canvas at 1/4 resolution. The
  fusion map is resized onto the content region and zero-padded elsewhere.
  """
  b, _, _, c = fusion.shape
  hh = max(1, round(content_hw[0] / 4))
  ww = max(1, round(content_hw[1] / 4))
  resized = jax.image.resize(fusion, (b, hh, ww, c), "linear", antialias=False)
  return jnp.pad(resized, ((0, 0), (0, mask_size - hh), (0, mask_size - ww), (0, 0)))


class FusionPointPromptEncoder(nn.Module):
  """k sparse point prompts from the fusion representation.

  `__call__(fusion (B, h, w, d_c), pe_fn, fg_embedding (C,), pixel_per_cell (sy, sx))`
  returns (tokens (B, k, C), coords (B, k, 2) xy in SAM's input frame, scores (B, h, w)).
  Positions come from `top_k` on the stop-gradient saliency (not differentiated); the
  features and saliency at the chosen positions are.
  """

  num_points: int = 8
  embed_dim: int = 256

  @nn.compact
  def __call__(self, fusion, pe_fn: Callable, fg_embedding, pixel_per_cell):
    b, h, w, _ = fusion.shape
    k = min(self.num_points, h * w)
    scores = nn.Conv(1, (1, 1), name="saliency")(fusion)[..., 0]  # (B, h, w)
    flat = scores.reshape(b, h * w)
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(flat), k)  # (B, k)
    ys, xs = idx // w, idx % w
    coords = jnp.stack([(xs + 0.5) * pixel_per_cell[1], (ys + 0.5) * pixel_per_cell[0]], -1)
    feats = jnp.take_along_axis(fusion.reshape(b, h * w, -1), idx[..., None], axis=1)
    gate = jax.nn.sigmoid(jnp.take_along_axis(flat, idx, axis=1))[..., None]  # (B, k, 1)
    tokens = pe_fn(coords) + fg_embedding
    tokens = tokens + gate * nn.Dense(self.embed_dim, name="feature_proj")(feats)
    return tokens, coords, scores
