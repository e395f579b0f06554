"""SAM's two-way transformer (port of `segment_anything.modeling.transformer`)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fusionsam_jax.models.sam.common import MLP, MLPBlock

Dtype = Any


def _layer_norm(name: str, dtype, sam2: bool):
  # SAM 2's port computes the variance as E[(x - mean)^2] (use_fast_variance=False).
  return nn.LayerNorm(epsilon=1e-5, dtype=dtype, use_fast_variance=not sam2, name=name)


class Attention(nn.Module):
  """Attention with an optional channel downsampling of q/k/v (SAM's transformer `Attention`)."""

  embedding_dim: int
  num_heads: int
  downsample_rate: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q, k, v, key_mask=None):  # (B, Nq, C), (B, Nk, C), (B, Nk, C)
    """`key_mask` (B, Nk) bool: False keys get zero attention weight (None: all keys)."""
    internal_dim = self.embedding_dim // self.downsample_rate
    assert internal_dim % self.num_heads == 0, "num_heads must divide embedding_dim"
    q = nn.Dense(internal_dim, dtype=self.dtype, name="q_proj")(q)
    k = nn.Dense(internal_dim, dtype=self.dtype, name="k_proj")(k)
    v = nn.Dense(internal_dim, dtype=self.dtype, name="v_proj")(v)
    b, nq, _ = q.shape
    hd = internal_dim // self.num_heads
    q = q.reshape(b, nq, self.num_heads, hd)
    k = k.reshape(b, -1, self.num_heads, hd)
    v = v.reshape(b, -1, self.num_heads, hd)
    attn = jnp.einsum("bqnc,bknc->bnqk", q, k) / jnp.sqrt(jnp.asarray(hd, q.dtype))
    attn = attn.astype(jnp.float32)
    if key_mask is not None:
      attn = jnp.where(key_mask[:, None, None, :], attn, -jnp.inf)
    attn = jax.nn.softmax(attn, axis=-1).astype(v.dtype)
    out = jnp.einsum("bnqk,bknc->bqnc", attn, v).reshape(b, nq, internal_dim)
    return nn.Dense(self.embedding_dim, dtype=self.dtype, name="out_proj")(out)


class TwoWayAttentionBlock(nn.Module):
  """Self-attn on tokens, token->image, MLP, image->token (SAM's `TwoWayAttentionBlock`).

  `sam2`: SAM 2's block (`sam2.modeling.sam.transformer`): the same computation with the MLP
  as `mlp/layers_{0,1}` (SAM: `mlp/lin1`, `lin2`)."""

  embedding_dim: int
  num_heads: int
  mlp_dim: int = 2048
  attention_downsample_rate: int = 2
  skip_first_layer_pe: bool = False
  dtype: Dtype = jnp.float32
  sam2: bool = False

  @nn.compact
  def __call__(self, queries, keys, query_pe, key_pe, token_mask=None):
    """`token_mask` (B, Nq) bool marks real tokens; padding tokens are never attended to."""
    ln = lambda name: _layer_norm(name, self.dtype, self.sam2)
    self_attn = Attention(self.embedding_dim, self.num_heads, dtype=self.dtype,
                          name="self_attn")
    if self.skip_first_layer_pe:
      queries = self_attn(queries, queries, queries, token_mask)
    else:
      q = queries + query_pe
      queries = queries + self_attn(q, q, queries, token_mask)
    queries = ln("norm1")(queries)

    q, k = queries + query_pe, keys + key_pe
    queries = queries + Attention(self.embedding_dim, self.num_heads,
                                  self.attention_downsample_rate, dtype=self.dtype,
                                  name="cross_attn_token_to_image")(q, k, keys)
    queries = ln("norm2")(queries)

    if self.sam2:
      mlp = MLP(self.mlp_dim, self.embedding_dim, 2, dtype=self.dtype, name="mlp")
    else:
      mlp = MLPBlock(self.embedding_dim, self.mlp_dim, act=jax.nn.relu, dtype=self.dtype,
                     name="mlp")
    queries = ln("norm3")(queries + mlp(queries))

    q, k = queries + query_pe, keys + key_pe
    keys = keys + Attention(self.embedding_dim, self.num_heads, self.attention_downsample_rate,
                            dtype=self.dtype, name="cross_attn_image_to_token")(k, q, queries,
                                                                        token_mask)
    keys = ln("norm4")(keys)
    return queries, keys


class TwoWayTransformer(nn.Module):
  """SAM's `TwoWayTransformer`: tokens and image embedding attend to each other (`sam2`:
  SAM 2's, see `TwoWayAttentionBlock`)."""

  depth: int = 2
  embedding_dim: int = 256
  num_heads: int = 8
  mlp_dim: int = 2048
  attention_downsample_rate: int = 2
  dtype: Dtype = jnp.float32
  sam2: bool = False

  @nn.compact
  def __call__(self, image_embedding, image_pe, point_embedding, token_mask=None):
    """image_embedding, image_pe: (B, h, w, C); point_embedding: (B, N, C).

    `token_mask` (B, N) bool: padding tokens (False) are masked out of every attention
    over tokens, so the real tokens' outputs equal those of the unpadded sequence.

    Returns (queries (B, N, C), keys (B, h*w, C)).
    """
    b, h, w, c = image_embedding.shape
    keys = image_embedding.reshape(b, h * w, c)
    key_pe = image_pe.reshape(image_pe.shape[0], h * w, c)
    queries = point_embedding
    for i in range(self.depth):
      queries, keys = TwoWayAttentionBlock(
          self.embedding_dim, self.num_heads, self.mlp_dim, self.attention_downsample_rate,
          skip_first_layer_pe=(i == 0), dtype=self.dtype, sam2=self.sam2,
          name=f"layers_{i}")(queries, keys, point_embedding, key_pe, token_mask)
    q, k = queries + point_embedding, keys + key_pe
    queries = queries + Attention(self.embedding_dim, self.num_heads,
                                  self.attention_downsample_rate, dtype=self.dtype,
                                  name="final_attn_token_to_image")(q, k, keys)
    queries = _layer_norm("norm_final_attn", self.dtype, self.sam2)(queries)
    return queries, keys
