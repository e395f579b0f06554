"""grain pipelines: shuffling, resume, aligned augmentation, sharding, full-coverage eval."""

import gc
import os

import grain.python as grain
import numpy as np
import pytest

from fusionsam_jax.data import generate, pipeline, prepare
from fusionsam_jax.data.sources import InMemorySource, load_source

NO_SHARD = grain.ShardOptions(shard_index=0, shard_count=1, drop_remainder=True)


@pytest.fixture(scope="module")
def mem_source():
  return InMemorySource(generate.generate_elements("mfnet", 12, seed=0, height=40, width=56))


def _names(loader, n_batches):
  it = iter(loader)
  return [list(next(it)["name"]) for _ in range(n_batches)]


def _train(source, **kw):
  args = dict(batch_size=4, crop_size=(32, 48), scale_range=(0.75, 1.5), seed=0,
              shard_options=NO_SHARD)
  args.update(kw)
  return pipeline.train_loader(source, **args)


def test_batch_format(mem_source):
  b = next(iter(_train(mem_source)))
  assert set(b) == {"rgb", "thermal", "label", "name"}
  assert b["rgb"].shape == (4, 32, 48, 3) and b["rgb"].dtype == np.uint8
  assert b["thermal"].shape == (4, 32, 48, 1) and b["thermal"].dtype == np.uint8
  assert b["label"].shape == (4, 32, 48) and b["label"].dtype == np.int32
  assert b["name"].shape == (4,) and isinstance(b["name"][0], str)


def test_seeded_order_and_per_epoch_shuffle(mem_source):
  a = _names(_train(mem_source, seed=1), 6)  # 12 elements / 4 = 3 batches per epoch
  assert a == _names(_train(mem_source, seed=1), 6)
  assert a != _names(_train(mem_source, seed=2), 6)
  epoch0, epoch1 = sum(a[:3], []), sum(a[3:], [])
  all_names = sorted(e["name"] for e in mem_source)
  assert sorted(epoch0) == all_names and sorted(epoch1) == all_names  # each once per epoch
  assert epoch0 != epoch1  # reshuffled


def test_drop_remainder_and_num_epochs(mem_source):
  batches = list(_train(mem_source, batch_size=5, num_epochs=1))
  assert len(batches) == 2 and all(len(b["name"]) == 5 for b in batches)


def _assert_same_batches(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("worker_count", [0, 1])
def test_resume_from_state(mem_source, worker_count):
  loader = _train(mem_source, worker_count=worker_count)
  it = iter(loader)
  for _ in range(4):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  it2 = iter(_train(mem_source, worker_count=worker_count))
  it2.set_state(state)
  _assert_same_batches(expected, [next(it2) for _ in range(4)])
  del it, it2
  gc.collect()


def test_sharding_by_process(mem_source):
  names = []
  for i in range(2):
    opts = grain.ShardOptions(shard_index=i, shard_count=2, drop_remainder=True)
    names.append(set(sum(_names(_train(mem_source, batch_size=3, shard_options=opts), 2),
                         [])))
  assert not names[0] & names[1]
  assert names[0] | names[1] == {e["name"] for e in mem_source}


def _pattern_element(h=36, w=52, seed=0, block=4):
  """rgb, thermal, depth and label all encode the same block pattern of class ids."""
  rng = np.random.default_rng(seed)
  cells = rng.integers(0, 9, (h // block + 1, w // block + 1))
  label = np.kron(cells, np.ones((block, block)))[:h, :w]
  label = label.astype(np.uint8)
  palette = rng.integers(0, 256, (256, 3)).astype(np.uint8)
  return {"rgb": palette[label], "thermal": (label * 20 + 7)[..., None],
          "depth": (label * 9 + 3)[..., None], "label": label, "name": "pattern"}, palette


def test_augmentation_is_identical_across_modalities():
  el, palette = _pattern_element()
  el = pipeline.Standardize().map(el)
  aug = pipeline.RandomScaleCropFlip((40, 40), scale_range=(0.6, 1.8), image_resample="nearest")
  draws = []
  for s in range(30):
    draws.append(aug.draw(36, 52, np.random.default_rng(s)))
    out = aug.random_map(el, np.random.default_rng(s))  # same draw as above
    lab = out["label"]
    assert lab.shape == (40, 40) and out["rgb"].shape == (40, 40, 3)
    real = lab != 255
    np.testing.assert_array_equal(out["rgb"][real], palette[lab[real]])
    np.testing.assert_array_equal(out["thermal"][..., 0][real], lab[real] * 20 + 7)
    np.testing.assert_array_equal(out["depth"][..., 0][real], lab[real] * 9 + 3)
    assert (out["rgb"][~real] == 0).all() and (out["thermal"][~real] == 0).all()
    unflipped = pipeline.scale_crop_flip(el, crop_size=(40, 40), image_resample="nearest",
                                         **dict(draws[-1], flip=False))
    want = unflipped["label"][:, ::-1] if draws[-1]["flip"] else unflipped["label"]
    np.testing.assert_array_equal(lab, want)
# the draws did exercise flips, up- and down-scaling, and padding
  assert {d["flip"] for d in draws} == {True, False}
  assert min(d["scale"] for d in draws) < 0.9 and max(d["scale"] for d in draws) > 1.3
  assert any(min(d["offset"]) < 0 for d in draws)


def test_bilinear_images_stay_aligned_with_label():
  """Bilinear images blend block borders; the label fits them best with no shift."""
  el, _ = _pattern_element(72, 104, seed=3, block=8)
  aug = pipeline.RandomScaleCropFlip((64, 64), scale_range=(0.6, 1.6))
  for s in range(8):
    out = aug.random_map(pipeline.Standardize().map(el), np.random.default_rng(s))
    thermal = out["thermal"][..., 0].astype(int)
    fit = {}
    for dy in (-1, 0, 1):
      for dx in (-1, 0, 1):
        lab = np.roll(out["label"], (dy, dx), (0, 1))
        real = lab != 255
        fit[dy, dx] = (np.abs(thermal[real] - (lab[real] * 20 + 7)) <= 2).mean()
    assert max(fit, key=fit.get) == (0, 0) and fit[0, 0] > 0.6, fit


def test_scale_crop_flip_geometry():
  el, _ = _pattern_element(20, 30)
  el = pipeline.Standardize().map(el)
  out = pipeline.scale_crop_flip(el, scale=1.0, crop_size=(20, 30), offset=(0, 0), flip=True)
  np.testing.assert_array_equal(out["label"], el["label"][:, ::-1])
  np.testing.assert_array_equal(out["rgb"], el["rgb"][:, ::-1])
  out = pipeline.scale_crop_flip(el, scale=1.0, crop_size=(24, 30), offset=(-2, 5), flip=False)
  np.testing.assert_array_equal(out["label"][2:22, :25], el["label"][:, 5:])
  assert (out["label"][:2] == 255).all() and (out["label"][:, 25:] == 255).all()
  out = pipeline.scale_crop_flip(el, scale=2.0, crop_size=(40, 60), offset=(0, 0), flip=False)
  np.testing.assert_array_equal(out["label"][::2, ::2], el["label"])


def _check_eval_cover(source, loader, expect_shape=None):
  total = sum(np.asarray(e["label"]).size for e in source)
  seen, valid_sum = [], 0
  for b in loader:
    if expect_shape:
      assert b["valid"].shape[1:] == expect_shape
    assert b["valid"].dtype == bool
    valid_sum += int(b["valid"].sum())
    assert (b["label"][~b["valid"]] == 255).all()
    for i, name in enumerate(b["name"]):
      if name:
        seen.append(name)
        h, w = next(np.asarray(e["label"]).shape for e in source if e["name"] == name)
        assert b["valid"][i].sum() == h * w and b["valid"][i, :h, :w].all()
      else:
        assert not b["valid"][i].any()
  return seen, valid_sum, total


def test_eval_covers_every_pixel_once(mem_source):
  loader = pipeline.eval_loader(mem_source, batch_size=5, pad_to=(48, 64), shard_count=1,
                                shard_index=0)
  seen, valid_sum, total = _check_eval_cover(mem_source, loader, (48, 64))
  assert sorted(seen) == sorted(e["name"] for e in mem_source)  # each exactly once
  assert valid_sum == total
  assert pipeline.num_eval_batches(len(mem_source), 5) == len(list(loader)) == 3


def test_eval_pixels_unchanged(mem_source):
  loader = pipeline.eval_loader(mem_source, batch_size=4, pad_multiple=16, shard_count=1,
                                shard_index=0)
  b = next(iter(loader))
  assert b["rgb"].shape == (4, 48, 64, 3)
  np.testing.assert_array_equal(b["rgb"][0, :40, :56], mem_source[0]["rgb"])
  np.testing.assert_array_equal(b["label"][0, :40, :56], mem_source[0]["label"])


def test_eval_mixed_sizes_and_shards():
  els = [dict(generate.generate_scene("fmb", i, 0, 30 + 4 * (i % 3), 40 + 2 * i))
         for i in range(7)]
  src = InMemorySource(els)
  seen_all, valid_all, counts = [], 0, []
  for shard in range(2):
    loader = pipeline.eval_loader(src, batch_size=2, pad_multiple=8, shard_count=2,
                                  shard_index=shard)
    seen, valid_sum, total = _check_eval_cover(src, loader)
    seen_all += seen
    valid_all += valid_sum
    counts.append(len(list(loader)))
  assert sorted(seen_all) == sorted(e["name"] for e in els)
  assert valid_all == total
  assert counts[0] == counts[1] == pipeline.num_eval_batches(7, 2, 2)


def test_pipelines_on_prepared_tfds_source(tmp_path):
  src = tmp_path / "src"
  generate.generate_dataset("vdt", src, 8, seed=0, height=32, width=40)
  prepare.prepare_dataset("vdt", src, tmp_path / "dst", progress=False)
  train = load_source("vdt", "train", tmp_path / "dst")
  b = next(iter(_train(train, batch_size=2, crop_size=(24, 24))))
  assert set(b) == {"rgb", "depth", "thermal", "label", "name"}
  assert b["depth"].shape == (2, 24, 24, 1) and set(np.unique(b["label"])) <= {0, 1, 255}
  test = load_source("vdt", "test", tmp_path / "dst")
  seen, valid_sum, total = _check_eval_cover(
      [dict(e, name=e["name"].decode()) for e in test],
      pipeline.eval_loader(test, batch_size=3, shard_count=1, shard_index=0))
  assert len(seen) == len(test) and valid_sum == total


def test_default_sharding_uses_jax_processes(mem_source):
  opts = pipeline.process_shard_options()
  assert (opts.shard_index, opts.shard_count) == (0, 1)  # a single CPU process
  loader = pipeline.train_loader(mem_source, batch_size=2, crop_size=(16, 16))
  assert next(iter(loader))["rgb"].shape == (2, 16, 16, 3)
  assert len(list(pipeline.eval_loader(mem_source, batch_size=5))) == 3


def test_input_pipeline_sized_to_the_host():
  """train.worker_count / device_prefetch None: sized to the host's cores (the paper configs);
  a set value is kept (the demo's in-process loader)."""
  from configs import demo, mfnet
  from fusionsam_jax.data import spec as D
  c = mfnet.get_config()
  assert c.train.worker_count is None and c.train.device_prefetch is None
  # 2-core CI box: in-process loader, 2 batches ahead; the 16-core GPU host: 8 workers
  # (half the cores, capped), one device batch per worker.
  assert (D.worker_count(c, cpus=2), D.device_prefetch(c, cpus=2)) == (0, 2)
  assert (D.worker_count(c, cpus=16), D.device_prefetch(c, cpus=16)) == (8, 8)
  assert (D.worker_count(c, cpus=6), D.device_prefetch(c, cpus=6)) == (3, 3)
  assert D.worker_count(c, cpus=128) == 8
  assert 1 <= D.host_cpus() <= (os.cpu_count() or 1)
  d = demo.get_config()
  assert D.worker_count(d, cpus=16) == 0 and D.device_prefetch(d, cpus=16) == 2
  c.train.worker_count, c.train.device_prefetch = 3, 5
  assert (D.worker_count(c, cpus=16), D.device_prefetch(c, cpus=16)) == (3, 5)
