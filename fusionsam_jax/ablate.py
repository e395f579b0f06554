"""``python -m fusionsam_jax.ablate``: the `fusionsam_jax.cli.ablate` command."""

if __name__ == "__main__":
  from fusionsam_jax.cli import ablate, driver
  driver.main(ablate)
