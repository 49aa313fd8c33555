"""Face affect in photos, videos and streams: the Python API (Analyzer) and what it
gives (rows, summaries, plots)."""
from affect_jax.video.analyzer import Analysis, Analyzer, Model
from affect_jax.video.rows import FaceRow

__all__ = ["Analysis", "Analyzer", "FaceRow", "Model"]
