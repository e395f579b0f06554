"""``python -m fusionsam_jax.train``: the `fusionsam_jax.cli.train` command."""

if __name__ == "__main__":
  from fusionsam_jax.cli import driver, train
  driver.main(train)
