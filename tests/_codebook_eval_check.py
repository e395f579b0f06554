"""The tokenizer stage's val pass (`stages.tokenizer.codebook_eval`) on a tiny generated set
with fixed random tokenizers.

`setup(data_dir)` and `val_pass(setup, mesh)` are imported by the test (one process, one
device). Run as a script, one of several processes (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID; CPU collectives over gloo), it writes to the JSON file
argv[2] the pass on the mesh of every process's devices, each process loading its share of
val ("global"), and on this process's device alone ("local")."""

import json
import os
import sys

import jax
import numpy as np

from _cli_helpers import tiny_config
from fusionsam_jax.data import spec as D
from fusionsam_jax.models import factory
from fusionsam_jax.models.fusionsam import FusionSAM
from fusionsam_jax.stages import tokenizer
from fusionsam_jax.training import mesh as mesh_lib


def setup(data_dir: str) -> dict:
  config = tiny_config(data_dir)
  config.generate.num = 40                 # ~10 val images: two batches of 8, one padded
  config.eval.batch_size = 8
  spec = D.ensure_data(config, say=lambda _: None)
  model = factory.build_model(config)
  params = {}
  for i, (m, c) in enumerate((("rgb", 3), ("thermal", 1))):
    x = np.random.default_rng(i).uniform(size=(1, 96, 128, c)).astype(np.float32)
    params.update(model.init(jax.random.PRNGKey(i), x, m, method=FusionSAM.tokenizer)["params"])
  return dict(config=config, spec=spec, model=model, params=params)


def val_pass(s: dict, mesh) -> dict:
  return tokenizer.codebook_eval(s["model"], s["config"], s["spec"], mesh)(s["params"])


def main(data_dir: str, out: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  assert mesh_lib.maybe_initialize_distributed()
  s = setup(data_dir)
  res = {"global": val_pass(s, mesh_lib.make_mesh()),
         "local": val_pass(s, mesh_lib.make_mesh(jax.local_devices()[:1])),
         "n_devices": jax.device_count(), "n_processes": jax.process_count(),
         "val_images": s["spec"].split_size("val")}
  with open(out, "w") as f:
    json.dump(res, f)


if __name__ == "__main__":
  assert os.environ.get("JAX_COORDINATOR_ADDRESS"), "run as one of several processes"
  main(sys.argv[1], sys.argv[2])
