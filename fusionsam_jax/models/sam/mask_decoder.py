"""SAM's mask decoder (port of `segment_anything.modeling.mask_decoder`)."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fusionsam_jax.models.sam.common import MLP, ConvTranspose2x2, LayerNorm2d, gelu
from fusionsam_jax.models.sam.transformer import TwoWayTransformer

Dtype = Any


class OutputUpscaling(nn.Module):
  """convT2x2 -> LN2d -> GELU -> convT2x2 -> GELU (SAM's `output_upscaling`): 4x upsampling.
  `with_skips`: SAM 2's path, the projected stride-8 / stride-4 backbone features added in."""

  transformer_dim: int = 256
  dtype: Dtype = jnp.float32

  def setup(self):
    self.layers_0 = ConvTranspose2x2(self.transformer_dim // 4, dtype=self.dtype)
    self.layers_1 = LayerNorm2d()
    self.layers_3 = ConvTranspose2x2(self.transformer_dim // 8, dtype=self.dtype)

  def __call__(self, x):  # (B, h, w, C) -> (B, 4h, 4w, C/8)
    x = gelu(self.layers_1(self.layers_0(x)))
    return gelu(self.layers_3(x))

  def with_skips(self, x, feat_s0, feat_s1):
    """x (B, h, w, C), feat_s0 (B, 4h, 4w, C/8), feat_s1 (B, 2h, 2w, C/4) -> (B, 4h, 4w, C/8)."""
    x = gelu(self.layers_1(self.layers_0(x) + feat_s1.astype(x.dtype)))
    return gelu(self.layers_3(x) + feat_s0.astype(x.dtype))


class MaskDecoder(nn.Module):
  """SAM's mask decoder: two-way transformer, hypernetwork MLPs, IoU head."""

  transformer_dim: int = 256
  num_multimask_outputs: int = 3
  iou_head_depth: int = 3
  iou_head_hidden_dim: int = 256
  transformer_depth: int = 2
  transformer_num_heads: int = 8
  transformer_mlp_dim: int = 2048
  dtype: Dtype = jnp.float32

  def setup(self):
    self.num_mask_tokens = self.num_multimask_outputs + 1
    self.transformer = TwoWayTransformer(self.transformer_depth, self.transformer_dim,
                                         self.transformer_num_heads, self.transformer_mlp_dim,
                                         dtype=self.dtype)
    self.iou_token = nn.Embed(1, self.transformer_dim)
    self.mask_tokens = nn.Embed(self.num_mask_tokens, self.transformer_dim)
    self.output_upscaling = OutputUpscaling(self.transformer_dim, dtype=self.dtype)
    self.output_hypernetworks_mlps = [
        MLP(self.transformer_dim, self.transformer_dim // 8, 3, dtype=self.dtype,
            name=f"output_hypernetworks_mlps_{i}") for i in range(self.num_mask_tokens)]
    self.iou_prediction_head = MLP(self.iou_head_hidden_dim, self.num_mask_tokens,
                                   self.iou_head_depth, dtype=self.dtype)

  def __call__(self, image_embeddings, image_pe, sparse_prompt_embeddings,
               dense_prompt_embeddings, multimask_output: bool, sparse_mask=None):
    """image_embeddings: (Bi, h, w, C), Bi = 1 or B; image_pe: (1, h, w, C);
    sparse: (B, N, C); dense: (B, h, w, C); sparse_mask: optional (B, N) bool, False for
    padding tokens (they are excluded from attention, as if absent).

    Returns masks (B, M, 4h, 4w) and iou_pred (B, M), M = 3 if multimask_output else 1.
    """
    masks, iou_pred = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings,
                                         dense_prompt_embeddings, sparse_mask)
    if multimask_output:
      return masks[:, 1:], iou_pred[:, 1:]
    return masks[:, :1], iou_pred[:, :1]

  def predict_masks(self, image_embeddings, image_pe, sparse_prompt_embeddings,
                    dense_prompt_embeddings, sparse_mask=None):
    b = sparse_prompt_embeddings.shape[0]
    output_tokens = jnp.concatenate([self.iou_token.embedding, self.mask_tokens.embedding], 0)
    output_tokens = jnp.broadcast_to(output_tokens[None], (b,) + output_tokens.shape)
    tokens = jnp.concatenate([output_tokens, sparse_prompt_embeddings.astype(output_tokens.dtype)],
                             1)
    # SAM repeats the image embedding per prompt set (repeat_interleave over dim 0).
    src = jnp.repeat(image_embeddings, b // image_embeddings.shape[0], axis=0)
    src = src + dense_prompt_embeddings
    pos_src = jnp.broadcast_to(image_pe, src.shape)
    _, h, w, c = src.shape
    token_mask = None
    if sparse_mask is not None:
      token_mask = jnp.concatenate([jnp.ones((b, output_tokens.shape[1]), bool),
                                    sparse_mask.astype(bool)], 1)
    hs, src = self.transformer(src, pos_src, tokens, token_mask)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens, :]
    upscaled = self.output_upscaling(src.reshape(b, h, w, c))  # (B, 4h, 4w, C/8)
    hyper_in = jnp.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in
                          enumerate(self.output_hypernetworks_mlps)], axis=1)  # (B, M, C/8)
    masks = jnp.einsum("bmc,bhwc->bmhw", hyper_in, upscaled)
    iou_pred = self.iou_prediction_head(iou_token_out)
    return masks, iou_pred
