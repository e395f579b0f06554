"""The training stages, declared once, in training order.

Each entry is a `common.StageSpec` (name, ``make(ctx)``, RNG offset). `experiment.train`
runs ``for spec in REGISTRY: spec.build(ctx)``; the config's ``train.stages`` holds one
entry per name; the benchmarks and the ablation CLI read the names and order from here.
The offsets keep every run's keys and shuffles: the stage's PRNG key is ``PRNGKey(seed *
1000 + rng_offset)`` and its training iterator shuffles with ``seed + rng_offset``.
"""

from __future__ import annotations

from fusionsam_jax.stages import common, fusion, segmentation, tokenizer

REGISTRY: tuple[common.StageSpec, ...] = (
    common.StageSpec(tokenizer.NAME, tokenizer.make, rng_offset=1),
    common.StageSpec(fusion.NAME, fusion.make, rng_offset=2),
    common.StageSpec(segmentation.NAME, segmentation.make, rng_offset=3),
)

#: The stage names in training order.
NAMES: tuple[str, ...] = tuple(s.name for s in REGISTRY)


def get(name: str) -> common.StageSpec:
  """The spec of stage `name`; raises ValueError naming the known stages."""
  for s in REGISTRY:
    if s.name == name:
      return s
  raise ValueError(f"unknown stage {name!r}: expected one of {', '.join(NAMES)}")


def final() -> common.StageSpec:
  """The last stage: the one whose checkpoints hold a trained run's best / latest params."""
  return REGISTRY[-1]


def build(ctx: common.Context, name: str) -> common.Stage | None:
  """Stage `name` for `ctx` (None: nothing to train)."""
  return get(name).build(ctx)


def check_config(config) -> None:
  """Raises ValueError when ``config.train.stages`` lacks a registered stage or has an
  entry that is not one."""
  have = set(config.train.stages.keys())
  missing = [n for n in NAMES if n not in have]
  extra = sorted(have - set(NAMES))
  if missing or extra:
    raise ValueError("config.train.stages must have one entry per stage ("
                     + ", ".join(NAMES) + ")"
                     + (f"; missing {', '.join(missing)}" if missing else "")
                     + (f"; unknown {', '.join(extra)}" if extra else ""))
