"""``python -m fusionsam_jax.evaluate``: the `fusionsam_jax.cli.evaluate` command."""

if __name__ == "__main__":
  from fusionsam_jax.cli import driver, evaluate
  driver.main(evaluate)
