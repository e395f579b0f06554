"""VGG16 converter (CLI), loader, Flax features vs. PyTorch, perceptual distance."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusionsam_jax.models.vgg import (FEATURE_LAYERS, PerceptualLoss, VGG16Features,
                                      load_vgg16_params, params_from_torch_state_dict)

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "convert_vgg16.py")
# torchvision vgg16().features layout; ReLU outputs after conv1_2, 2_2, 3_3, 4_3, 5_3.
CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
RELU_TAPS = (3, 8, 15, 22, 29)
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _torch_vgg16_features():
  layers, cin = [], 3
  for c in CFG:
    if c == "M":
      layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
    else:
      layers += [torch.nn.Conv2d(cin, c, kernel_size=3, padding=1),
                 torch.nn.ReLU(inplace=True)]
      cin = c
  return torch.nn.Sequential(*layers)


def _torch_taps(net, x_nhwc):
  x = torch.from_numpy(((x_nhwc - MEAN) / STD).transpose(0, 3, 1, 2).copy())
  taps = []
  with torch.no_grad():
    for i, layer in enumerate(net):
      x = layer(x)
      if i in RELU_TAPS:
        taps.append(x.numpy().transpose(0, 2, 3, 1).copy())
  return taps


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  torch.manual_seed(0)
  torch.set_num_threads(1)
  net = _torch_vgg16_features().eval()
  d = tmp_path_factory.mktemp("vgg")
  sd = {f"features.{k}": v for k, v in net.state_dict().items()}
  sd["classifier.0.weight"] = torch.zeros(4, 3)          # ignored by the converter
  pth = d / "vgg16.pth"
  torch.save(sd, pth)
  out = d / "vgg16.npz"
  r = subprocess.run([sys.executable, TOOL, "--weights", str(pth), "--output", str(out)],
                     capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 0, r.stderr
  return net, pth, out


def test_converted_features_match_torch(converted):
  net, _, out = converted
  params = load_vgg16_params(str(out))
  x = np.random.default_rng(0).uniform(size=(1, 64, 64, 3)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    feats = jax.jit(VGG16Features().apply)({"params": params}, jnp.asarray(x))
  for name, ref in zip(FEATURE_LAYERS, _torch_taps(net, x)):
    got = np.asarray(feats[name])
    assert got.shape == ref.shape, name
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < 1e-4, (name, err)


def test_perceptual_loss_needs_params_and_matches_formula(converted):
  net, _, out = converted
  with pytest.raises(ValueError, match="never runs on random"):
    PerceptualLoss(None)
  with pytest.raises(ValueError, match="missing VGG16 layer"):
    PerceptualLoss({})
  loss = PerceptualLoss.from_file(str(out))
  rng = np.random.default_rng(1)
  x = rng.uniform(size=(2, 32, 32, 3)).astype(np.float32)
  y = np.clip(x + 0.1 * rng.normal(size=x.shape), 0, 1).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    f = jax.jit(lambda lf, a, b: lf(a, b))          # the loss object is a pytree argument
    d = np.asarray(f(loss, jnp.asarray(x), jnp.asarray(y)))
    d_same = np.asarray(f(loss, jnp.asarray(x), jnp.asarray(x)))
    g = jax.jit(jax.grad(lambda b: jnp.sum(loss(jnp.asarray(x), b))))(jnp.asarray(y))
  ref = np.zeros(2)
  for fx, fy in zip(_torch_taps(net, x), _torch_taps(net, y)):
    nx = fx / (np.sqrt((fx.astype(np.float64) ** 2).sum(-1, keepdims=True)) + 1e-10)
    ny = fy / (np.sqrt((fy.astype(np.float64) ** 2).sum(-1, keepdims=True)) + 1e-10)
    ref += ((nx - ny) ** 2).sum(-1).mean(axis=(1, 2))
  np.testing.assert_allclose(d, ref, rtol=1e-3)
  assert (d > 0).all() and np.allclose(d_same, 0.0, atol=1e-6)
  assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).sum()) > 0
  # 1-channel images are repeated to RGB.
  x1 = jnp.asarray(x[..., :1])
  assert f(loss, x1, x1).shape == (2,)


def test_converter_rejects_bad_files(converted, tmp_path):
  _, pth, _ = converted
  bad = tmp_path / "truncated.pth"
  bad.write_bytes(pth.read_bytes()[: os.path.getsize(pth) // 2])
  out = tmp_path / "out.npz"
  r = subprocess.run([sys.executable, TOOL, "--weights", str(bad), "--output", str(out)],
                     capture_output=True, text=True, cwd=ROOT)
  assert r.returncode != 0
  err = r.stderr.strip()
  assert err.startswith("error:") and "\n" not in err and "truncated.pth" in err
  assert sorted(os.listdir(tmp_path)) == ["truncated.pth"]   # no output, no temp file
  r = subprocess.run([sys.executable, TOOL, "--weights", str(tmp_path / "nope.pth"),
                      "--output", str(out)], capture_output=True, text=True, cwd=ROOT)
  assert r.returncode != 0 and "not found" in r.stderr and not out.exists()


def test_state_dict_and_loader_errors(converted, tmp_path):
  net, _, out = converted
  sd = {f"features.{k}": v.numpy() for k, v in net.state_dict().items()}
  missing = {k: v for k, v in sd.items() if not k.startswith("features.28.")}
  with pytest.raises(ValueError, match=r"missing keys: features\.28\.weight, "
                                       r"features\.28\.bias"):
    params_from_torch_state_dict(missing)
  wrong = dict(sd, **{"features.5.weight": np.zeros((128, 64, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"features\.5\.weight: expected \(128, 64, 3, 3\), "
                                       r"found \(128, 64, 1, 1\)"):
    params_from_torch_state_dict(wrong)
  with pytest.raises(FileNotFoundError, match="not found"):
    load_vgg16_params(str(tmp_path / "missing.npz"))
  junk = tmp_path / "junk.npz"
  junk.write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="junk.npz"):
    load_vgg16_params(str(junk))
  other = tmp_path / "other.npz"
  np.savez(other, a=np.zeros(3))
  with pytest.raises(ValueError, match="not a converted VGG16"):
    load_vgg16_params(str(other))


def test_converter_refuses_bad_tensors_and_names_random_bytes(converted, tmp_path, capsys):
  """Issue 17, defect 10 for the VGG16 converter: NaN / int tensors were cast to float32;
  random bytes were called 'arbitrary objects'."""
  import importlib.util
  import torch
  spec = importlib.util.spec_from_file_location("convert_vgg16", TOOL)
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  net, _, _ = converted
  sd = {f"features.{k}": v for k, v in net.state_dict().items()}
  nan = torch.full_like(sd["features.0.bias"], float("nan"))
  rand = tmp_path / "rand.pth"
  rand.write_bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes())
  for bad, needles in ((dict(sd, **{"features.0.bias": nan}), ["'features.0.bias'", "non-finite"]),
                       (dict(sd, **{"features.0.bias": sd["features.0.bias"].long()}),
                        ["'features.0.bias'", "torch.int64"]),
                       (None, ["rand.pth", "not a readable"])):
    pth = rand
    if bad is not None:
      pth = tmp_path / "bad.pth"
      torch.save(bad, pth)
    assert tool.main(["--weights", str(pth), "--output", str(tmp_path / "o.npz")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "arbitrary objects" not in err, err
    for n in needles:
      assert n in err, err
  assert not (tmp_path / "o.npz").exists()
