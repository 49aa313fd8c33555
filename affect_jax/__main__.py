"""`python -m affect_jax <command> [flags]`: the `affect-jax` console script's commands."""
import sys

from affect_jax import cli

if __name__ == "__main__":
  sys.exit(cli.main())
