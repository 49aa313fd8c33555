"""Checkpoint retention: the last K and the best by the chosen score survive."""
import jax.numpy as jnp
import numpy as np

from affect_jax.train import checkpoints


def test_keeps_the_latest_and_the_best(tmp_path):
  manager = checkpoints.create_checkpoint_manager(str(tmp_path), keep=2,
                                                  best_metric="p_mtl",
                                                  asynchronous=False)
  scores = {2: 0.9, 4: 0.3, 6: 0.2, 8: 0.25}
  for step in range(1, 9):
    state = {"w": jnp.full((3,), float(step))}
    metrics = {"p_mtl": scores[step], "expr_confusion": [[1]]} if step in scores else None
    checkpoints.save_checkpoint(manager, step, state, metrics=metrics)
  manager.wait_until_finished()
  assert manager.best_step() == 2
  assert set(manager.all_steps()) >= {2, 7, 8}
  assert 1 not in manager.all_steps() and 4 not in manager.all_steps()
  restored = checkpoints.restore_checkpoint(manager, 2, {"w": jnp.zeros((3,))})
  np.testing.assert_array_equal(restored["w"], [2.0, 2.0, 2.0])
