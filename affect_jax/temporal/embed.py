"""Per-frame embeddings of a trained frame model: the pooled ResNet features (the input
of its task heads) of every frame of a source, computed once, in (video, frame) order,
into an embedding store (affect_jax/temporal/store.py).

The source is one of affect_jax.inference.sources' (a TFDS split with labels, or face
images on disk without); the checkpoint is restored by the one restore path of
evaluation and prediction (`checkpoints.restore_for_eval`). Memory stays bounded: the
frames stream through in batches and the rows go to disk as they come; only the
(video, frame) order of the split, a few bytes a frame, is held whole.
"""
from __future__ import annotations

import functools
import logging
import os

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from affect_jax import data_parallel
from affect_jax.data import pipeline, records
from affect_jax.inference import restore, sources
from affect_jax.model import implementation, multitask
from affect_jax.temporal.store import INDEX_FILE, EmbeddingStore, StoreWriter
from affect_jax.train import checkpoints

log = logging.getLogger(__name__)


def frame_order(data) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(positions sorted by video and frame, their video names, their frames) of a
  sources.TfdsRecords or sources.ImageFiles. TFDS stores records shuffled: their
  video and frame fields are read once (no image is decoded)."""
  if isinstance(data, sources.TfdsRecords):
    raw = data.records
    fields = [(raw[i]["video"], raw[i]["frame"]) for i in range(len(raw))]
    videos = np.array([v.decode() if isinstance(v, bytes) else str(v)
                       for v, _ in fields], dtype=str)
    frames = np.array([int(f) for _, f in fields], np.int64)
  else:
    videos = np.array([item.video for item in data.items], dtype=str)
    frames = np.array([item.frame for item in data.items], np.int64)
  order = np.lexsort((frames, videos))
  return order, videos[order], frames[order]


class LoadRanked(grain.transforms.Map):
  """Rank in the sorted order -> the frame's example with its rank; -1 -> padding."""

  def __init__(self, data, order: np.ndarray):
    self._data = data
    self._order = order

  def map(self, rank):
    rank = int(rank)
    example = (self._data.padding() if rank < 0
               else self._data.example(int(self._order[rank])))
    example["rank"] = np.int32(rank)
    return example


def _features_step(state, images, *, dtype):
  variables = {"params": state.params["model"], "batch_stats": state.batch_stats}
  outputs = state.apply_fn(variables, pipeline.normalize_images(images, dtype),
                           train=False, return_features=True)
  return outputs["features"].astype(np.float32)


def compile_features_step(config, mesh):
  resolved = implementation.implementation_for(config.model, mesh)
  step = functools.partial(_features_step, dtype=multitask.DTYPES[config.model.dtype])
  return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(data_parallel.AXIS)),
                               out_specs=P(data_parallel.AXIS)),
                 compiler_options=implementation.compiler_options(resolved) or None)


def host_arrays(tree):
  """Host NumPy copies; all processes' rows in a multi-process run."""
  if jax.process_count() > 1:
    return jax.tree.map(lambda v: np.asarray(
        multihost_utils.process_allgather(v, tiled=True)), tree)
  return jax.tree.map(np.asarray, tree)


def _rows(writer: StoreWriter, batch: dict, features: np.ndarray, has_labels: bool
          ) -> np.ndarray:
  rows = np.zeros(len(features), writer.dtype)
  rows["frame"] = batch["frame"]
  rows["source_index"] = batch["position"]
  rows["embedding"] = features
  if has_labels:
    for key in ("expression", "expression_mask", "au", "au_mask", "valence_arousal",
                "va_mask"):
      rows[key] = batch[key]
  return rows


def write_embeddings(frame_config, frame_workdir: str, data, folder: str, *,
                     step: int | None = None, batch_size: int = 256, devices=None,
                     worker_count: int = 0, description: str = "") -> EmbeddingStore:
  """Embeds every frame of `data` with checkpoint `step` of the frame run (default:
  the best, else the latest) into a store in `folder`."""
  mesh = data_parallel.create_mesh(devices)
  state = checkpoints.restore_for_eval(frame_config, frame_workdir, mesh, step)
  features_fn = compile_features_step(frame_config, mesh)
  order, videos, _ = frame_order(data)
  global_batch = restore.prediction_batch_size(batch_size, mesh.devices.size)
  local = global_batch // jax.process_count()
  ranks = np.arange(jax.process_index(), len(order), jax.process_count())
  batches = pipeline.eval_num_batches(len(order), local, jax.process_count())
  ranks = np.concatenate([ranks, np.full(batches * local - len(ranks), -1)])
  ds = grain.MapDataset.source(ranks).map(LoadRanked(data, order)).batch(local)
  metadata = {"frame_workdir": os.path.abspath(frame_workdir), "frame_step":
              int(state.step), "source": description, "has_labels": data.has_labels,
              "tasks": list(frame_config.model.tasks),
              "num_expr_classes": int(frame_config.model.num_expr_classes)}
  writer = None
  iterator = pipeline.as_iterator(ds, worker_count)
  try:
    for local_batch in iterator:
      images = data_parallel.device_batch({"image": local_batch.pop("image")},
                                          mesh)["image"]
      host = host_arrays({"features": features_fn(state, images), "batch": local_batch})
      batch, features = host["batch"], host["features"]
      keep = np.flatnonzero(batch["rank"] >= 0)
      keep = keep[np.argsort(batch["rank"][keep])]  # processes' rows interleave
      if writer is None and jax.process_index() == 0:
        writer = StoreWriter(folder, features.shape[-1], metadata)
      if writer is not None:
        writer.add(videos[batch["rank"][keep]],
                   _rows(writer, {k: v[keep] for k, v in batch.items()},
                         features[keep], data.has_labels))
  finally:
    if hasattr(iterator, "close"):
      iterator.close()
  if writer is not None:
    writer.close()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"embeddings {folder}")
  store = EmbeddingStore(folder)
  log.info("embeddings of %s: %d frames of %d videos (checkpoint step %d) in %s",
           description, len(store), len(store.video_names), int(state.step), folder)
  return store


def store_folder(config, workdir: str, split: str) -> str:
  """Where a temporal run keeps the embeddings of a split."""
  return os.path.join(config.embeddings.dir or os.path.join(workdir, "embeddings"),
                      split)


def split_store(config, workdir: str, split: str) -> EmbeddingStore:
  """The embeddings of `split` of the frame run's dataset: read when a complete store
  of the same frame run (and step, when the config names one) exists, else computed."""
  folder = store_folder(config, workdir, split)
  frame_workdir = config.frame_run.workdir
  if os.path.exists(os.path.join(folder, INDEX_FILE)):
    store = EmbeddingStore(folder)
    same_run = store.index["frame_workdir"] == os.path.abspath(frame_workdir)
    step = config.frame_run.step
    if same_run and (step is None or store.index["frame_step"] == step):
      return store
    log.info("%s holds embeddings of another checkpoint: computing them again", folder)
  frame_config = restore.load_config(frame_workdir, data_dir=config.frame_run.data_dir)
  name = frame_config.dataset.name
  raw = records.open_data_source(name, split, frame_config.dataset.data_dir)
  data = sources.TfdsRecords(raw, frame_config.input.image_size, f"{name} {split}")
  return write_embeddings(frame_config, frame_workdir, data, folder,
                          step=config.frame_run.step,
                          batch_size=config.embeddings.batch_size,
                          worker_count=frame_config.input.worker_count,
                          description=f"{name} {split}")
