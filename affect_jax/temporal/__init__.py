"""The temporal stage: per-frame embeddings of a trained frame model (embed, store), a
GRU or Transformer over windows of them (windows, model, steps, loop), and per-frame
predictions in the frame model's form (prediction); `affect-jax temporal` (command)."""
