"""SAM's prompt encoder (port of `segment_anything.modeling.prompt_encoder`).

Sparse prompts (points with labels, boxes) become (B, N, embed_dim) tokens; a low-res mask
(B, 4*h, 4*w, 1) becomes the (B, h, w, embed_dim) dense embedding. Coordinates are in the
1024-pixel input frame, (x, y) order, as in SAM.
"""

import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fusionsam_jax.models.sam.common import LayerNorm2d, gelu


class PositionEmbeddingRandom(nn.Module):
  """Random-Fourier positional encoding (SAM's `PositionEmbeddingRandom`).

  The Gaussian matrix is a fixed buffer in SAM; here it lives in the param tree under
  `positional_encoding_gaussian_matrix` (excluded from training by the optimizer masks).
  """

  num_pos_feats: int = 64
  scale: float = 1.0

  def setup(self):
    self.positional_encoding_gaussian_matrix = self.param(
        "positional_encoding_gaussian_matrix",
        lambda key, shape: self.scale * jax.random.normal(key, shape), (2, self.num_pos_feats))

  def _pe_encoding(self, coords):  # (..., 2) in [0, 1] -> (..., 2 * num_pos_feats)
    coords = 2 * coords - 1
    coords = coords @ self.positional_encoding_gaussian_matrix
    coords = 2 * math.pi * coords
    return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

  def __call__(self, size: Tuple[int, int]):
    """Dense PE for a (h, w) grid: (h, w, 2 * num_pos_feats)."""
    h, w = size
    y_embed = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
    x_embed = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
    grid = jnp.stack(jnp.broadcast_arrays(x_embed[None, :], y_embed[:, None]), axis=-1)
    return self._pe_encoding(grid)

  def forward_with_coords(self, coords, image_size: Tuple[int, int]):
    """PE of pixel coordinates (B, N, 2) in an image of (H, W) pixels."""
    coords = coords.astype(jnp.float32)
    coords = jnp.stack([coords[..., 0] / image_size[1], coords[..., 1] / image_size[0]], -1)
    return self._pe_encoding(coords)


class MaskDownscaling(nn.Module):
  """conv2x2/2 -> LN2d -> GELU -> conv2x2/2 -> LN2d -> GELU -> conv1x1 (SAM's `mask_downscaling`).

  Named layers `layers_0`, `layers_1`, `layers_3`, `layers_4`, `layers_6` mirror the
  indices of SAM's `nn.Sequential` (activations have no params).
  """

  mask_in_chans: int = 16
  embed_dim: int = 256

  @nn.compact
  def __call__(self, x):  # (B, 4h, 4w, C_in) -> (B, h, w, embed_dim)
    x = nn.Conv(self.mask_in_chans // 4, (2, 2), strides=(2, 2), padding="VALID",
                name="layers_0")(x)
    x = gelu(LayerNorm2d(name="layers_1")(x))
    x = nn.Conv(self.mask_in_chans, (2, 2), strides=(2, 2), padding="VALID", name="layers_3")(x)
    x = gelu(LayerNorm2d(name="layers_4")(x))
    return nn.Conv(self.embed_dim, (1, 1), name="layers_6")(x)


class PromptEncoder(nn.Module):
  """SAM's prompt encoder.

  Attributes mirror SAM's constructor. `image_embedding_size` is (h, w) of the image
  embedding (64, 64 for 1024 input), `input_image_size` the padded input (1024, 1024).
  """

  embed_dim: int = 256
  image_embedding_size: Tuple[int, int] = (64, 64)
  input_image_size: Tuple[int, int] = (1024, 1024)
  mask_in_chans: int = 16

  def setup(self):
    self.pe_layer = PositionEmbeddingRandom(self.embed_dim // 2)
    # 4 point embeddings: negative, positive, box top-left, box bottom-right.
    self.point_embeddings = [nn.Embed(1, self.embed_dim, name=f"point_embeddings_{i}")
                             for i in range(4)]
    self.not_a_point_embed = nn.Embed(1, self.embed_dim)
    self.mask_downscaling = MaskDownscaling(self.mask_in_chans, self.embed_dim)
    self.no_mask_embed = nn.Embed(1, self.embed_dim)

  def get_dense_pe(self):
    """(1, h, w, embed_dim) positional encoding of the image embedding grid."""
    return self.pe_layer(self.image_embedding_size)[None]

  def _embed_points(self, points, labels, pad: bool):
    points = points.astype(jnp.float32) + 0.5  # shift to the pixel centre
    labels = labels.astype(jnp.int32)
    if pad:
      points = jnp.concatenate([points, jnp.zeros((points.shape[0], 1, 2), points.dtype)], 1)
      labels = jnp.concatenate([labels, -jnp.ones((labels.shape[0], 1), labels.dtype)], 1)
    emb = self.pe_layer.forward_with_coords(points, self.input_image_size)  # (B, N, C)
    lab = labels[..., None]
    emb = jnp.where(lab == -1, 0.0, emb)
    emb = emb + jnp.where(lab == -1, self.not_a_point_embed.embedding[0], 0.0)
    emb = emb + jnp.where(lab == 0, self.point_embeddings[0].embedding[0], 0.0)
    emb = emb + jnp.where(lab == 1, self.point_embeddings[1].embedding[0], 0.0)
    return emb

  def _embed_boxes(self, boxes):  # (B, 4) xyxy -> (B, 2, C)
    coords = (boxes.astype(jnp.float32) + 0.5).reshape(-1, 2, 2)
    emb = self.pe_layer.forward_with_coords(coords, self.input_image_size)
    emb = emb.at[:, 0, :].add(self.point_embeddings[2].embedding[0])
    return emb.at[:, 1, :].add(self.point_embeddings[3].embedding[0])

  def _embed_masks(self, masks):  # (B, 4h, 4w, C_in)
    return self.mask_downscaling(masks)

  def __call__(self, points: Optional[Tuple[Any, Any]] = None, boxes=None, masks=None):
    """Returns (sparse (B, N, C), dense (B, h, w, C)).

    points: (coords (B, N, 2), labels (B, N)); label 1 foreground, 0 background,
    -1 padding. boxes: (B, 4). masks: (B, 4h, 4w, 1) low-res mask logits.
    """
    if points is not None:
      bs = points[0].shape[0]
    elif boxes is not None:
      bs = boxes.shape[0]
    elif masks is not None:
      bs = masks.shape[0]
    else:
      bs = 1
    sparse = jnp.zeros((bs, 0, self.embed_dim), jnp.float32)
    if points is not None:
      sparse = jnp.concatenate(
          [sparse, self._embed_points(points[0], points[1], pad=boxes is None)], 1)
    if boxes is not None:
      sparse = jnp.concatenate([sparse, self._embed_boxes(boxes)], 1)
    no_mask = self.no_mask_embed.embedding[0]  # always touched so init creates it
    if masks is not None:
      dense = self._embed_masks(masks)
    else:
      h, w = self.image_embedding_size
      dense = jnp.broadcast_to(no_mask, (bs, h, w, self.embed_dim))
    return sparse, dense

  def embed_padded(self, coords, labels, point_valid, boxes, box_valid, masks, mask_valid):
    """Every prompt kind in one fixed layout (no Python branches, so one compilation).

    coords (B, Np, 2), labels (B, Np) with -1 in padding slots, point_valid (B, Np) bool;
    boxes (B, 4), box_valid (B,) bool; masks (B, 4h, 4w, 1), mask_valid (B,) bool.
    Returns (sparse (B, Np + 2, C), sparse_mask (B, Np + 2), dense (B, h, w, C)). Tokens
    where sparse_mask is False are padding: the decoder leaves them out of attention, so
    the result equals `__call__` on the unpadded prompts (SAM's own "pad" point, added
    when there is no box, is a valid -1 slot here).
    """
    sparse = jnp.concatenate([self._embed_points(coords, labels, pad=False),
                              self._embed_boxes(boxes)], 1)
    box_valid = jnp.asarray(box_valid, bool)
    sparse_mask = jnp.concatenate([jnp.asarray(point_valid, bool),
                                   jnp.stack([box_valid, box_valid], 1)], 1)
    h, w = self.image_embedding_size
    no_mask = jnp.broadcast_to(self.no_mask_embed.embedding[0], (coords.shape[0], h, w,
                                                                   self.embed_dim))
    dense = jnp.where(jnp.asarray(mask_valid, bool)[:, None, None, None],
                      self._embed_masks(masks), no_mask)
    return sparse, sparse_mask, dense
