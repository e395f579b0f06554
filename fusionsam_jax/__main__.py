"""``python -m fusionsam_jax <command> [flags]``: every command-line tool (`cli.COMMANDS`)."""

if __name__ == "__main__":
  from fusionsam_jax import cli
  cli.main()
