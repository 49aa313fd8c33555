"""Ahead-of-time compilation of the train and eval steps for accelerators this host does
not have: chip table, topologies, compile + analysis, largest-batch search, the
`affect-jax compile` command (affect_jax.aot.command)."""
