"""LSTG: Latent Space Token Generation (FusionSAM Sec. 3.2.2, Eq. 2-6).

A VQGAN-style tokenizer per modality:

    z_i   = E(I_i)                      Eq. 2   -> ``Encoder``
    I_i^q = Quant(z_i)                  Eq. 3   -> ``VectorQuantizer``
    Î_i   = G(I_i^q)                    Eq. 4   -> ``Decoder``
    codebook + beta * commitment terms  Eq. 6   -> ``VectorQuantizer`` outputs

The reconstruction (Eq. 5), perceptual (Eq. 7) and adversarial (Eq. 8) losses live in
``fusionsam_jax.losses``; this module returns everything they need.

Shapes (channels-last, see docs/conventions.md):
    images  x      (B, H, W, C)      float32 in [0, 1], C = 3 (RGB) or 1 (thermal / depth)
    latents z, z_q (B, h, w, d_c)    h = H / s, w = W / s
    indices        (B, h, w)         int32 in [0, K)
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from fusionsam_jax.models.precision import cast_floating

Array = jax.Array


def num_groups_for(channels: int, max_groups: int = 32) -> int:
  """Largest group count <= ``max_groups`` that divides ``channels`` (GroupNorm)."""
  g = math.gcd(channels, max_groups)
  return max(g, 1)


def resolve_ch_mult(scale: int, ch_mult: Optional[Sequence[int]]) -> tuple[int, ...]:
  """Channel multipliers per resolution level; ``len == log2(scale) + 1``.

  ``None`` gives ``(1, 2, 2, ..., 2)``. Raises ValueError if ``scale`` is not a power of two
  or if ``ch_mult`` has the wrong length.
  """
  if scale < 1 or (scale & (scale - 1)) != 0:
    raise ValueError(f"scale must be a power of two >= 1, got {scale}")
  num_down = int(round(math.log2(scale)))
  if ch_mult is None:
    return (1,) + (2,) * num_down
  ch_mult = tuple(int(m) for m in ch_mult)
  if len(ch_mult) != num_down + 1:
    raise ValueError(
        f"ch_mult must have log2(scale) + 1 = {num_down + 1} entries for scale={scale}, "
        f"got {ch_mult}")
  return ch_mult


class ResBlock(nn.Module):
  """GroupNorm -> SiLU -> conv3x3 -> GroupNorm -> SiLU -> conv3x3, plus (1x1) skip."""

  out_ch: int
  max_groups: int = 32

  @nn.compact
  def __call__(self, x: Array) -> Array:  # (B, H, W, C_in) -> (B, H, W, out_ch)
    in_ch = x.shape[-1]
    h = nn.GroupNorm(num_groups=num_groups_for(in_ch, self.max_groups), name="norm1")(x)
    h = nn.silu(h)
    h = nn.Conv(self.out_ch, (3, 3), padding=1, name="conv1")(h)
    h = nn.GroupNorm(num_groups=num_groups_for(self.out_ch, self.max_groups), name="norm2")(h)
    h = nn.silu(h)
    h = nn.Conv(self.out_ch, (3, 3), padding=1, name="conv2")(h)
    if in_ch != self.out_ch:
      x = nn.Conv(self.out_ch, (1, 1), name="skip")(x)
    return x + h


class Downsample(nn.Module):
  """Stride-2 conv 3x3 with VQGAN's asymmetric (0, 1) padding: (B,H,W,C) -> (B,H/2,W/2,C)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)),
                   name="conv")(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 then conv 3x3: (B,H,W,C) -> (B,2H,2W,C)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return nn.Conv(x.shape[-1], (3, 3), padding=1, name="conv")(x)


class Encoder(nn.Module):
  """E of Eq. 2: (B, H, W, C) -> z (B, H/s, W/s, d_c).

  conv_in 3x3 -> per level ``num_res_blocks`` ResBlocks at ``ch * ch_mult[level]``
  (+ stride-2 Downsample between levels, ``log2(scale)`` of them) -> 2 mid ResBlocks ->
  GroupNorm -> SiLU -> conv_out 3x3 to ``latent_dim``.
  """

  latent_dim: int = 64          # d_c
  ch: int = 64
  ch_mult: Optional[Sequence[int]] = None   # None -> (1, 2, ..., 2), len = log2(scale) + 1
  num_res_blocks: int = 2
  scale: int = 4                # s
  max_groups: int = 32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    mult = resolve_ch_mult(self.scale, self.ch_mult)
    h = nn.Conv(self.ch * mult[0], (3, 3), padding=1, name="conv_in")(x)
    for level, m in enumerate(mult):
      for i in range(self.num_res_blocks):
        h = ResBlock(self.ch * m, self.max_groups, name=f"down_{level}_block_{i}")(h)
      if level != len(mult) - 1:
        h = Downsample(name=f"down_{level}_downsample")(h)
    c = self.ch * mult[-1]
    h = ResBlock(c, self.max_groups, name="mid_block_1")(h)
    h = ResBlock(c, self.max_groups, name="mid_block_2")(h)
    h = nn.GroupNorm(num_groups=num_groups_for(c, self.max_groups), name="norm_out")(h)
    h = nn.silu(h)
    return nn.Conv(self.latent_dim, (3, 3), padding=1, name="conv_out")(h)  # (B,h,w,d_c)


class Decoder(nn.Module):
  """G of Eq. 4 (mirror of ``Encoder``): (B, h, w, d_c) -> (B, h*s, w*s, out_channels).

  conv_in 3x3 -> 2 mid ResBlocks -> per level (coarse to fine) ``num_res_blocks + 1``
  ResBlocks (+ nearest Upsample x2 between levels) -> GroupNorm -> SiLU -> conv_out 3x3.
  The output is linear (no activation). ``conv_out`` is the "last layer" whose kernel the
  VQGAN adaptive weight uses: ``params["decoder"]["conv_out"]["kernel"]`` in a tokenizer.
  """

  out_channels: int = 3
  ch: int = 64
  ch_mult: Optional[Sequence[int]] = None
  num_res_blocks: int = 2
  scale: int = 4
  max_groups: int = 32

  @nn.compact
  def __call__(self, z: Array) -> Array:
    mult = resolve_ch_mult(self.scale, self.ch_mult)
    c = self.ch * mult[-1]
    h = nn.Conv(c, (3, 3), padding=1, name="conv_in")(z)
    h = ResBlock(c, self.max_groups, name="mid_block_1")(h)
    h = ResBlock(c, self.max_groups, name="mid_block_2")(h)
    for level in reversed(range(len(mult))):
      for i in range(self.num_res_blocks + 1):
        h = ResBlock(self.ch * mult[level], self.max_groups,
                     name=f"up_{level}_block_{i}")(h)
      if level != 0:
        h = Upsample(name=f"up_{level}_upsample")(h)
    h = nn.GroupNorm(num_groups=num_groups_for(h.shape[-1], self.max_groups),
                     name="norm_out")(h)
    h = nn.silu(h)
    return nn.Conv(self.out_channels, (3, 3), padding=1, name="conv_out")(h)


def _l2_normalize(x: Array, eps: float = 1e-6) -> Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class VectorQuantizer(nn.Module):
  """Quant of Eq. 3 with the two terms of Eq. 6.

  Codebook health (options named after their sources; all off = VQGAN):
    ``l2_normalize``  cosine codes: latents and codes l2-normalised before the search
                      (ViT-VQGAN, Yu et al. 2022, Sec. 3.2).
    ``lookup_dim``    factorized codes: the search runs in a ``lookup_dim``-d space,
                      ``proj_in`` (d_c -> lookup_dim) before it, ``proj_out`` (lookup_dim ->
                      d_c) after it (ViT-VQGAN; they use 32-d / 8-d lookups). The codebook
                      is then (K, lookup_dim) and ``z``, the Eq. 6 terms and
                      ``encodings`` live in the lookup space; ``z_q`` is d_c-d.
    dead-code restart: ``restart_dead_codes`` below, applied by the trainer after updates
                      (Jukebox, Dhariwal et al. 2020, "random restarts"; SoundStream,
                      Zeghidour et al. 2021, Sec. 3.3: codes whose exponential moving
                      average of use per batch falls below a threshold get random
                      vectors of the current batch). ``usage_decay`` set: a (K,) leaf
                      ``usage`` holds that average (a param with zero gradient, written
                      only by the restart, so it is checkpointed with the codebook); it
                      starts at 0, so the first step restarts every code the batch used
                      fewer than threshold / (1 - decay) times: a data-driven init.
    ``entropy_weight`` entropy penalty (MAGVIT-v2: Yu et al. 2024, "Language Model Beats
                      Diffusion", the LFQ entropy loss, here on VQ distances): with
                      soft assignments q = softmax(-d / ``entropy_temperature``) over the
                      codes, ``entropy_weight * (mean_n H(q_n) - H(mean_n q_n))``: each
                      vector confident of one code, the batch spread over all of them.
                      Added to ``vq_loss``; gradients reach the codes and the encoder.

  Codebook ``C`` is a (K, d_c) parameter named ``codebook`` (init uniform(-1/K, 1/K) as in
  VQGAN). For each latent vector the nearest entry by squared Euclidean distance is chosen
  (distances computed at HIGHEST matmul precision so the argmin does not depend on the
  ambient precision setting).

  Returns a dict:
      z                 (B, h, w, d_c)  encoder output (l2-normalised if ``l2_normalize``)
      z_q               (B, h, w, d_c)  straight-through codes ``z + sg[c - z]``: value of
                                        the code, gradient of ``z``
      indices           (B, h, w) int32
      codebook_loss     ()  mean ||sg[z] - c||^2   (gradient to the codebook only)
      commitment_loss   ()  beta * mean ||z - sg[c]||^2   (gradient to the encoder only)
      entropy_loss      ()  the entropy penalty (0 when ``entropy_weight`` is 0)
      vq_loss           ()  codebook_loss + commitment_loss (Eq. 6 for one modality)
                            + entropy_loss
  Means are over all elements (B * h * w * d_c), as VQGAN does.
  """

  num_codes: int = 1024     # K
  code_dim: int = 64        # d_c
  beta: float = 0.25
  l2_normalize: bool = False
  lookup_dim: Optional[int] = None   # None: search in d_c (no projections)
  usage_decay: Optional[float] = None  # EMA decay of code use (dead-code restart state)
  entropy_weight: float = 0.0
  entropy_temperature: float = 0.01

  def setup(self):
    k = self.num_codes
    dim = self.lookup_dim or self.code_dim
    self.codebook = self.param("codebook", _uniform_init(1.0 / k), (self.num_codes, dim))
    if self.usage_decay is not None:
      self.usage = self.param("usage", nn.initializers.zeros, (self.num_codes,))
    if self.lookup_dim:
      self.proj_in = nn.Dense(self.lookup_dim, name="proj_in")
      self.proj_out = nn.Dense(self.code_dim, name="proj_out")

  def lookup_space(self, z: Array) -> Array:
    """Encoder latents (..., d_c) -> the vectors the codebook search sees (float32 whatever
    the compute dtype: the normalisation and everything after it run in float32)."""
    if self.lookup_dim:
      z = self.proj_in(z)
    z = z.astype(jnp.promote_types(z.dtype, jnp.float32))
    return _l2_normalize(z) if self.l2_normalize else z

  def _codes(self) -> Array:  # (K, d_c)
    cb = self.codebook.astype(jnp.promote_types(self.codebook.dtype, jnp.float32))
    return _l2_normalize(cb) if self.l2_normalize else cb

  def __call__(self, z: Array) -> dict[str, Array]:
    if z.shape[-1] != self.code_dim:
      raise ValueError(f"latent channel dim {z.shape[-1]} != code_dim {self.code_dim}")
    compute_dtype = z.dtype     # of the encoder; z_q goes back to it for the decoder
    z = self.lookup_space(z)    # float32
    codes = self._codes()                                             # (K, d_c)
    hi = jax.lax.Precision.HIGHEST
    # The search, the lookup and the Eq. 6 terms run in float32 whatever the compute dtype
    # (a bf16 path picks the same codes as the float32 one, up to its own rounding of z).
    zf, cf = z.astype(jnp.float32), codes.astype(jnp.float32)
    d = (jnp.sum(zf * zf, axis=-1, keepdims=True)
         - 2.0 * jnp.einsum("...c,kc->...k", zf, cf, precision=hi)
         + jnp.sum(cf * cf, axis=-1))                                 # (B, h, w, K)
    indices = jnp.argmin(d, axis=-1).astype(jnp.int32)                # (B, h, w)
    # The code lookup as a one-hot matmul, not a gather: the gather's gradient is a
    # scatter-add into the codebook whose atomics serialise as the codes collapse onto a
    # few entries; the matmul costs the same whatever the indices. Exact at HIGHEST
    # precision.
    onehot = jax.nn.one_hot(indices, codes.shape[0], dtype=cf.dtype)  # (B, h, w, K)
    c = jnp.einsum("...k,kc->...c", onehot, codes.astype(jnp.float32),
                   precision=hi).astype(z.dtype)                      # (B, h, w, d_c)
    codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z) - c))
    commitment_loss = self.beta * jnp.mean(jnp.square(z - jax.lax.stop_gradient(c)))
    z_q = (z + jax.lax.stop_gradient(c - z)).astype(compute_dtype)    # straight-through
    if self.lookup_dim:
      z_q = self.proj_out(z_q)
    entropy_loss = jnp.zeros((), jnp.float32)
    if self.entropy_weight:
      entropy_loss = self.entropy_weight * entropy_penalty(d, self.entropy_temperature)
    return dict(z=z, z_q=z_q, indices=indices, codebook_loss=codebook_loss,
                commitment_loss=commitment_loss, entropy_loss=entropy_loss,
                vq_loss=codebook_loss + commitment_loss + entropy_loss)

  def lookup(self, indices: Array) -> Array:
    """(B, h, w) int -> codes (B, h, w, d_c)."""
    c = jnp.take(self._codes(), indices, axis=0)
    return self.proj_out(c) if self.lookup_dim else c


def entropy_penalty(dist: Array, temperature: float) -> Array:
  """MAGVIT-v2's entropy penalty from squared distances ``dist`` (..., K) to the codes:
  q = softmax(-dist / temperature) per vector; returns mean_n H(q_n) - H(mean_n q_n)
  (nats). Its minimum, -log K, is reached when every vector is sure of one code and the
  codes are used equally."""
  logq = jax.nn.log_softmax(-dist.reshape(-1, dist.shape[-1]) / temperature, axis=-1)
  q = jnp.exp(logq)                                                   # (N, K)
  per_vector = -jnp.mean(jnp.sum(q * logq, axis=-1))
  mean_q = jnp.mean(q, axis=0)
  batch = -jnp.sum(mean_q * jnp.log(jnp.maximum(mean_q, 1e-30)))
  return per_vector - batch


def _uniform_init(limit: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -limit, limit)
  return init


class LatentTokenizer(nn.Module):
  """LSTG for one modality (separate instance and params per modality).

  ``__call__(x)`` with x (B, H, W, in_channels) in [0, 1] returns
      z, z_q (B, H/s, W/s, latent_dim), indices (B, H/s, W/s),
      recon (B, H, W, in_channels) in [0, 1] scale (linear output, NOT clipped: clip only
      for display), codebook_loss, commitment_loss, vq_loss (scalars).
  Images are mapped to [-1, 1] before the encoder and the decoder output is mapped back
  with ``(y + 1) / 2`` (VQGAN convention).

  Methods for ``apply(..., method=...)``: ``encode`` (x -> quantizer dict), ``decode``
  (z_q -> recon), ``decode_indices`` (indices -> recon).

  Param tree: ``encoder``, ``quantizer`` (``codebook``), ``decoder`` (last layer
  ``decoder/conv_out/kernel``).
  """

  in_channels: int = 3
  latent_dim: int = 64          # d_c
  num_codes: int = 1024         # K
  ch: int = 64
  ch_mult: Optional[Sequence[int]] = None
  num_res_blocks: int = 2
  scale: int = 4                # s
  beta: float = 0.25
  l2_normalize: bool = False
  lookup_dim: Optional[int] = None
  usage_decay: Optional[float] = None
  entropy_weight: float = 0.0
  entropy_temperature: float = 0.01
  max_groups: int = 32

  def setup(self):
    self.encoder = Encoder(latent_dim=self.latent_dim, ch=self.ch, ch_mult=self.ch_mult,
                           num_res_blocks=self.num_res_blocks, scale=self.scale,
                           max_groups=self.max_groups)
    self.quantizer = VectorQuantizer(num_codes=self.num_codes, code_dim=self.latent_dim,
                                     beta=self.beta, l2_normalize=self.l2_normalize,
                                     lookup_dim=self.lookup_dim,
                                     usage_decay=self.usage_decay,
                                     entropy_weight=self.entropy_weight,
                                     entropy_temperature=self.entropy_temperature)
    self.decoder = Decoder(out_channels=self.in_channels, ch=self.ch, ch_mult=self.ch_mult,
                           num_res_blocks=self.num_res_blocks, scale=self.scale,
                           max_groups=self.max_groups)

  def _check_input(self, x: Array) -> None:
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"expected images (B, H, W, {self.in_channels}), got {x.shape}")
    if x.shape[1] % self.scale or x.shape[2] % self.scale:
      raise ValueError(f"image size {x.shape[1:3]} is not divisible by scale {self.scale}")

  def encode(self, x: Array) -> dict[str, Array]:
    """x (B, H, W, C) in [0, 1] -> quantizer dict (z, z_q, indices, loss terms)."""
    self._check_input(x)
    z = self.encoder(x * 2.0 - 1.0)                                   # (B, h, w, d_c)
    return self.quantizer(z)

  def decode(self, z_q: Array) -> Array:
    """z_q (B, h, w, d_c) -> recon (B, H, W, C), [0, 1] scale, unclipped."""
    return self.decoder(z_q) * 0.5 + 0.5

  def decode_indices(self, indices: Array) -> Array:
    """indices (B, h, w) -> recon (B, H, W, C)."""
    return self.decode(self.quantizer.lookup(indices))

  def __call__(self, x: Array) -> dict[str, Array]:
    out = dict(self.encode(x))
    out["recon"] = self.decode(out["z_q"])
    return out


def restart_codes(codebook: Array, encodings: Array, usage: Array, rng: Array, *,
                  threshold: float = 1.0) -> tuple[Array, Array]:
  """Dead-code restart (Jukebox's random restarts, SoundStream's codebook replacement):
  every code whose use per batch ``usage`` (K,) is below ``threshold`` is replaced by an
  encoding drawn at random from the batch (``encodings`` (..., D), the lookup-space
  vectors the codebook is searched with; distinct draws while the batch has >= K vectors).
  Returns (new codebook (K, D), bool (K,) restarted)."""
  k, d = codebook.shape
  flat = encodings.reshape(-1, d).astype(codebook.dtype)
  n = flat.shape[0]
  if n >= k:
    pick = jax.random.permutation(rng, n)[:k]
  else:
    pick = jax.random.randint(rng, (k,), 0, n)
  dead = usage < threshold
  new = jnp.where(dead[:, None], jax.lax.stop_gradient(flat[pick]), codebook)
  return new, dead


def ema_code_update(codebook: Array, encodings: Array, indices: Array,
                    decay: float) -> Array:
  """One step of the exponential-moving-average codebook update of VQ-VAE (van den Oord et
  al. 2017, Appendix A.1; VQ-VAE-2), without its cluster-size smoothing: each code used by
  the batch moves to ``decay * code + (1 - decay) * mean of the encodings assigned to it``
  (an online k-means step), unused codes stay. Sums by a one-hot matmul (no scatter).
  ``codebook`` (K, D), ``encodings`` (..., D), ``indices`` (...) -> (K, D)."""
  k, d = codebook.shape
  flat = jax.lax.stop_gradient(encodings.reshape(-1, d).astype(jnp.float32))
  onehot = jax.nn.one_hot(indices.reshape(-1), k, dtype=jnp.float32)        # (N, K)
  hi = jax.lax.Precision.HIGHEST
  sums = jnp.einsum("nk,nd->kd", onehot, flat, precision=hi)
  counts = jnp.sum(onehot, axis=0)[:, None]
  mean = sums / jnp.maximum(counts, 1.0)
  new = decay * codebook.astype(jnp.float32) + (1.0 - decay) * mean
  return jnp.where(counts > 0, new, codebook).astype(codebook.dtype)


def restart_dead_codes(tokenizer: "LatentTokenizer", params, x: Array, rng: Array, *,
                       threshold: float = 1.0, relative: bool = False,
                       code_ema: float | None = None, compute_dtype=None) -> tuple[Any, Array]:
  """One dead-code restart of a tokenizer's codebook on the batch ``x`` (B, H, W, C) in
  [0, 1]: encodes the batch with ``params`` (the tokenizer's own subtree; the encoder in
  ``compute_dtype`` when given, `precision.cast_floating`) and counts each
  code's use. With a ``usage`` leaf (``usage_decay`` set) the use is its moving average
  ``usage <- decay * usage + (1 - decay) * counts`` (restarted codes start again at the
  mean use N / K); without, this batch's counts (then a code that only images absent
  from a small batch use is lost). Codes below ``threshold`` restart (``restart_codes``).
  ``relative``: `threshold` is a fraction of the mean use per code, N / K (N = the batch's
  latent vectors), so that the restart means the same at any image size and batch: an
  absolute threshold of 1 is 1/3 of the mean at 32 x 48 images x 32 (3072 vectors for 1024
  codes) but 1/75 of it at 480 x 640 x 4 (76 800 vectors), where rarely used codes then
  stay and usage stays skewed (perplexity 17-22 % of K on the H100).
  ``code_ema``: before the restart, the used codes take one `ema_code_update` step towards
  the mean of their batch encodings (None: off).
  Returns (params with the new ``quantizer`` leaves, number restarted). Apply after an
  optimizer update (the Adam moments of a restarted code are kept)."""
  p = params
  if compute_dtype is not None:
    p, x = cast_floating(params, compute_dtype), x.astype(compute_dtype)
  out = tokenizer.apply({"params": p}, x, method=LatentTokenizer.encode)
  k = tokenizer.num_codes
  idx = out["indices"].reshape(-1)
  counts = jax.ops.segment_sum(jnp.ones(idx.shape, jnp.float32), idx, num_segments=k)
  q = dict(params["quantizer"])
  usage = counts
  if "usage" in q:
    d = float(tokenizer.usage_decay)
    usage = d * jax.lax.stop_gradient(q["usage"]) + (1.0 - d) * counts
  if code_ema is not None:
    q["codebook"] = ema_code_update(q["codebook"], out["z"], idx, float(code_ema))
  thr = float(threshold) * (idx.size / k if relative else 1.0)
  q["codebook"], dead = restart_codes(q["codebook"], out["z"], usage, rng, threshold=thr)
  if "usage" in q:
    q["usage"] = jnp.where(dead, idx.size / k, usage).astype(q["usage"].dtype)
  return dict(params, quantizer=q), jnp.sum(dead)


# Small presets. ``TINY`` is for tests and the CPU demo; ``BASE`` is a VQGAN-like default.
TINY: dict[str, Any] = dict(latent_dim=16, num_codes=128, ch=16, ch_mult=None,
                            num_res_blocks=1, scale=4)
BASE: dict[str, Any] = dict(latent_dim=64, num_codes=1024, ch=64, ch_mult=(1, 2, 2),
                            num_res_blocks=2, scale=4)
