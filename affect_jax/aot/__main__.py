"""`python -m affect_jax.aot`: the `affect-jax compile` command."""
import sys

from affect_jax.aot.command import main

sys.exit(main())
