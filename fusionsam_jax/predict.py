"""``python -m fusionsam_jax.predict``: the `fusionsam_jax.cli.predict` command."""

if __name__ == "__main__":
  from fusionsam_jax.cli import driver, predict
  driver.main(predict)
