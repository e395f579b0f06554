"""The tokenizer stage's val pass (`stages.tokenizer.codebook_eval`) on several meshes, same
params and data; writes the results to the JSON file named by argv[2] (argv[1]: data dir).

With --xla_force_host_platform_device_count=8: on an 8-device mesh and on a 1-device mesh.
Launched as one of several processes (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID; CPU collectives over gloo): on the mesh of every process's devices, each
process loading its share of val ("global"), and on this process's first device alone
("local")."""

import json
import sys

import jax
import numpy as np

from _cli_helpers import tiny_config
from fusionsam_jax.data import spec as D
from fusionsam_jax.models import factory
from fusionsam_jax.models.fusionsam import FusionSAM
from fusionsam_jax.stages import tokenizer
from fusionsam_jax.training import mesh as mesh_lib


def main(data_dir: str, out: str) -> None:
  import os
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    assert mesh_lib.maybe_initialize_distributed()
  config = tiny_config(data_dir)
  config.generate.num = 40                 # ~10 val images: two batches of 8, one padded
  config.eval.batch_size = 8
  spec = D.ensure_data(config, say=lambda _: None)
  model = factory.build_model(config)
  params = {}
  for i, (m, c) in enumerate((("rgb", 3), ("thermal", 1))):
    x = np.random.default_rng(i).uniform(size=(1, 96, 128, c)).astype(np.float32)
    params.update(model.init(jax.random.PRNGKey(i), x, m, method=FusionSAM.tokenizer)["params"])
  res = {}
  if jax.process_count() > 1:
    meshes = {"global": mesh_lib.make_mesh(),
              "local": mesh_lib.make_mesh(jax.local_devices()[:1])}
  else:
    meshes = {str(n): mesh_lib.make_mesh(jax.devices()[:n]) for n in (8, 1)}
  for name, mesh in meshes.items():
    res[name] = tokenizer.codebook_eval(model, config, spec, mesh)(params)
  res["n_devices"] = jax.device_count()
  res["n_processes"] = jax.process_count()
  res["val_images"] = spec.split_size("val")
  with open(out, "w") as f:
    json.dump(res, f)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
