"""``python -m fusionsam_jax.baseline``: the `fusionsam_jax.cli.baseline` command."""

if __name__ == "__main__":
  from fusionsam_jax.cli import baseline, driver
  driver.main(baseline)
