"""The temporal stage: embeddings of a trained frame model with their labels, windows
that score every frame once, the frame model's losses and metrics, learning a temporal
signal, resume after a kill, 1 device against 8, the non-finite guard, prediction."""
import json
import os

import jax
import numpy as np
import pytest

from affect_jax.data import records
from affect_jax.errors import InputError
from affect_jax.eval import metrics
from affect_jax.inference import frame_table, sources
from affect_jax.temporal import (
  command,
  compare,
  embed,
  loop,
  prediction,
  steps,
  windows,
)
from affect_jax.temporal.store import LABEL_FIELDS, EmbeddingStore, StoreWriter, row_dtype
from affect_jax.train import checkpoints, guards, losses, optimizers, step_functions
from configs import temporal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def temporal_config(embeddings_dir, frame_workdir="", **overrides):
  config = temporal.get_config()
  config.frame_run.workdir = frame_workdir
  config.embeddings.dir = str(embeddings_dir)
  settings = {"window.length": 8, "window.train_stride": 4, "window.eval_stride": 4,
              "input.batch_size": 8, "input.eval_batch_size": 8,
              "model.hidden_dim": 8, "model.dropout_rate": 0.0,
              "optimizer.warmup_steps": 1, "num_train_steps": 6, "log_every_steps": 3,
              "eval_every_steps": 6, "checkpoint_every_steps": 2, **overrides}
  for key, value in settings.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def write_store(folder, videos: dict, seed: int = 0) -> EmbeddingStore:
  """videos: name -> (embeddings [n, D], va [n, 2]); every frame VA-labelled, with
  some expression and AU labels."""
  rng = np.random.default_rng(seed)
  dim = next(iter(videos.values()))[0].shape[1]
  writer = StoreWriter(str(folder), dim, {"num_expr_classes": 8, "has_labels": True})
  for name, (embedding, va) in sorted(videos.items()):
    rows = np.zeros(len(embedding), row_dtype(dim))
    rows["frame"] = np.arange(1, len(embedding) + 1)
    rows["embedding"] = embedding
    rows["valence_arousal"], rows["va_mask"] = va, 1.0
    rows["expression"] = rng.integers(0, 8, len(embedding))
    rows["expression_mask"] = rng.random(len(embedding)) < 0.7
    rows["au"] = rng.random((len(embedding), 12)) < 0.3
    rows["au_mask"] = np.repeat(rng.random((len(embedding), 1)) < 0.6, 12, 1)
    writer.add([name] * len(rows), rows)
  return writer.close()


# The tiny frame model's feature width: the synthetic stores and the stores of the
# session's frame run then share compiled steps.
DIM = 64


def neighbour_signal_videos(rng, lengths, dim=DIM):
  """Valence at frame t follows the sum of feature 0 over frames t-4 .. t+4 but t
  (arousal: of feature 1): a frame's own features carry nothing of it. Features 4 on
  are 0 (the width only matches the frame model's)."""
  videos = {}
  for number, n in enumerate(lengths):
    embedding = np.zeros((n, dim), np.float32)
    embedding[:, :4] = rng.normal(size=(n, 4))
    kernel = np.array([1, 1, 1, 1, 0, 1, 1, 1, 1]) / np.sqrt(8)
    va = np.stack([np.convolve(embedding[:, d], kernel, "same") for d in (0, 1)], 1)
    videos[f"video{number:02d}"] = (embedding, np.tanh(va).astype(np.float32))
  return videos


@pytest.fixture(scope="module")
def synthetic_stores(tmp_path_factory):
  rng = np.random.default_rng(0)
  root = tmp_path_factory.mktemp("temporal_stores")
  return {"train": write_store(root / "train", neighbour_signal_videos(
              rng, [100, 83, 117, 91, 64, 150, 120, 99]), seed=1),
          "eval": write_store(root / "eval", neighbour_signal_videos(rng, [19, 45, 70, 90]),
                              seed=2)}


@pytest.fixture(scope="module")
def frame_stores(uninterrupted_run, tmp_path_factory):
  """Embeddings of both splits of the session's trained frame run ("xla")."""
  frame_config, frame_workdir = uninterrupted_run("xla")
  folder = tmp_path_factory.mktemp("frame_embeddings")
  config = temporal_config(folder, frame_workdir,
                           **{"frame_run.data_dir": frame_config.dataset.data_dir})
  stores = {split: embed.split_store(config, "unused", config.frame_run[f"{split}_split"])
            for split in ("train", "eval")}
  return config, stores


# ---------------------------------------------------------------------------------
# 1. Embeddings.
# ---------------------------------------------------------------------------------


def test_embeddings_are_the_frame_models_features_with_each_frames_labels(
    frame_stores, uninterrupted_run):
  config, stores = frame_stores
  frame_config, frame_workdir = uninterrupted_run("xla")
  store = stores["eval"]
  raw = records.open_data_source(frame_config.dataset.name, "validation",
                                 frame_config.dataset.data_dir)
  assert len(store) == len(raw) == 46
  rows = prediction.frame_columns(store)
  assert sorted(rows["source_index"].tolist()) == list(range(len(raw)))  # each once
  for video, name in enumerate(store.video_names):  # contiguous, in frame order
    frames = store.video_rows(video)["frame"]
    assert np.all(np.diff(frames) > 0)
    assert {raw[int(i)]["video"].decode() for i in
            store.video_rows(video)["source_index"]} == {name}
  for row in range(len(store)):
    record = records.record_to_example(raw[int(rows["source_index"][row])], 0)
    for key in LABEL_FIELDS:
      np.testing.assert_array_equal(rows[key][row], record[key], err_msg=key)
  # The features are the frame model's pooled features of these very images.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  state = checkpoints.restore_for_eval(frame_config, frame_workdir, mesh)
  data = sources.TfdsRecords(raw, frame_config.input.image_size, "validation")
  chosen = store.rows(0, 5)
  images = np.stack([data.example(int(i))["image"] for i in chosen["source_index"]])
  features = embed.compile_features_step(frame_config, mesh)(state, images)
  np.testing.assert_allclose(chosen["embedding"], np.asarray(features), rtol=1e-5,
                             atol=1e-5)
  # Computed once: a second request reads the same store.
  again = embed.split_store(config, "unused", "validation")
  assert os.path.getmtime(os.path.join(again.folder, "index.json")) == os.path.getmtime(
      os.path.join(store.folder, "index.json"))


def test_a_store_refuses_rows_it_could_not_index(tmp_path):
  writer = StoreWriter(str(tmp_path), 2, {})
  rows = np.zeros(2, row_dtype(2))
  rows["frame"] = [1, 2]
  writer.add(["a", "a"], rows)
  writer.add(["b"], rows[:1])
  with pytest.raises(ValueError, match="'a' is not contiguous"):
    writer.add(["a"], rows[:1])
  with pytest.raises(ValueError, match="frame 1 after frame 1"):
    writer.add(["b"], rows[:1])
  with pytest.raises(ValueError, match="no complete embedding store"):
    EmbeddingStore(str(tmp_path))  # no index until close


def test_weighted_losses_take_the_training_stores_label_counts(tmp_path):
  writer = StoreWriter(str(tmp_path / "store"), 2, {})
  rows = np.zeros(50, row_dtype(2))
  rows["frame"] = np.arange(50)
  rows["expression"] = np.arange(50) % 2 * 3  # classes 0 and 3 only, of 8
  rows["expression_mask"] = np.arange(50) % 5 > 0
  rows["au"] = np.arange(600).reshape(50, 12) % 7 == 0
  rows["au_mask"] = np.arange(50)[:, None] % 3 > 0
  writer.add(["v"] * 50, rows)
  store = writer.close()
  labelled = rows["expression"][rows["expression_mask"] > 0]
  config = temporal_config(tmp_path, **{"loss.expression": "weighted_ce",
                                        "loss.au": "weighted_bce"})
  settings = step_functions.loss_settings_from_config(
      config, loop.label_statistics(store, 8))
  counts = np.bincount(labelled, minlength=8)
  np.testing.assert_allclose(settings.class_weights,
                             losses.class_weights_from_counts(counts))
  au_labelled = rows["au_mask"][:, 0] > 0
  np.testing.assert_allclose(settings.au_pos_weights, losses.pos_weights_from_counts(
      rows["au"][au_labelled].sum(0), np.full(12, au_labelled.sum())))


# ---------------------------------------------------------------------------------
# 2. Windows, losses, metrics, training.
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("length,stride,padding", [(8, 4, "edge"), (5, 5, "zeros"),
                                                   (6, 1, "edge"), (7, 2, "zeros")])
def test_windows_score_every_frame_once_with_its_own_row(length, stride, padding):
  settings = windows.WindowSettings(length, stride, padding)
  for n in (1, 2, 5, 7, 13, 20):
    rows = np.zeros(n, row_dtype(1))
    rows["embedding"][:, 0] = np.arange(n) + 1.0
    rows["va_mask"] = 1.0
    scored = np.zeros(n, int)
    for start in windows.window_starts(n, settings):
      window = windows.assemble_window(rows[max(start, 0):start + length], int(start), n,
                                       settings)
      positions = window["position"][window["scored"] > 0]
      scored[positions] += 1
      real = window["position"] >= 0
      np.testing.assert_array_equal(window["embedding"][real, 0],
                                    window["position"][real] + 1.0)
      padded = window["embedding"][~real, 0]
      assert np.all(padded == 0) if padding == "zeros" else np.all(
          np.isin(padded, [1.0, float(n)]))
      np.testing.assert_array_equal(window["va_mask"], window["scored"])
    np.testing.assert_array_equal(scored, 1)


def random_windows(rng, size, length, dim):
  batch = {
      "embedding": rng.normal(size=(size, length, dim)).astype(np.float32),
      "expression": rng.integers(0, 8, (size, length)).astype(np.int32),
      "expression_mask": (rng.random((size, length)) < 0.7).astype(np.float32),
      "au": (rng.random((size, length, 12)) < 0.3).astype(np.float32),
      "au_mask": np.repeat(rng.random((size, length, 1)) < 0.6, 12, 2).astype(
          np.float32),
      "valence_arousal": rng.uniform(-1, 1, (size, length, 2)).astype(np.float32),
      "va_mask": (rng.random((size, length)) < 0.8).astype(np.float32),
      "scored": (rng.random((size, length)) < 0.5).astype(np.float32)}
  for key in ("expression_mask", "va_mask"):  # as assemble_window leaves them
    batch[key] *= batch["scored"]
  batch["au_mask"] *= batch["scored"][..., None]
  return batch


@pytest.mark.parametrize("kind", ["gru", "transformer"])
def test_losses_and_metrics_are_the_frame_models_on_the_scored_frames(tmp_path, kind):
  config = temporal_config(tmp_path, **REFERENCE, **{"model.kind": kind})
  model = loop.create_model(config)
  settings = step_functions.loss_settings_from_config(config, None)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  learning_rate_fn = optimizers.create_learning_rate_fn(config)
  state = steps.create_state(config, model, DIM, mesh, learning_rate_fn)
  batch = random_windows(np.random.default_rng(4), 16, 16, DIM)
  train_fn = steps.compile_train_step(mesh, settings=settings,
                                      learning_rate_fn=learning_rate_fn, seed=0)
  eval_fn = steps.compile_eval_step(mesh, num_expr_classes=8)
  statistics, probabilities = eval_fn(state, batch)
  _, step_metrics = train_fn(state, batch)
  # The frame model's functions on the scored frames alone (selected, not masked),
  # from the logits the probabilities give back.
  scored = batch["scored"].reshape(-1) > 0
  frames = lambda tree: {k: np.asarray(v).reshape((-1,) + v.shape[2:])[scored]  # noqa
                         for k, v in tree.items()}
  outputs = frames(probabilities)
  outputs["expression"] = np.log(outputs["expression"])
  outputs["au"] = np.log(outputs["au"]) - np.log1p(-outputs["au"])
  labels = frames({k: batch[k] for k in LABEL_FIELDS})
  expected = metrics.batch_statistics(outputs, labels, num_expr_classes=8)
  assert int(np.asarray(statistics["expr_confusion"]).sum()) == int(
      labels["expression_mask"].sum()) > 0
  for key, value in expected.items():
    np.testing.assert_allclose(np.asarray(statistics[key]), np.asarray(value),
                               rtol=1e-5, atol=1e-6, err_msg=key)
  expected_losses = step_functions.task_losses(outputs, labels, settings, None)
  for task, value in expected_losses.items():
    np.testing.assert_allclose(float(step_metrics[f"loss_{task}"]), float(value),
                               rtol=1e-5, err_msg=task)


def trained(config, workdir, stores, devices=None):
  trainer = loop.TemporalTrainer(config, str(workdir), devices=devices, stores=stores)
  state = loop.train_and_evaluate(config, str(workdir), trainer)
  return trainer, jax.device_get(state.params)


def final_scores(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    scores = json.loads(f.read().splitlines()[-1])
  return {k: v for k, v in scores.items() if k != "time"}


# One configuration for the tests that train: they share its compiled steps (the
# persistent compilation cache), whatever their number of steps (a constant rate after
# one warm-up step leaves the schedule out of the program).
REFERENCE = {"model.hidden_dim": 16, "model.num_heads": 2,
             "input.batch_size": 16, "input.eval_batch_size": 16,
             "window.length": 16, "window.train_stride": 2, "window.eval_stride": 8,
             "optimizer.learning_rate": 0.03, "optimizer.schedule": "constant",
             "num_train_steps": 8, "eval_every_steps": 4, "checkpoint_every_steps": 4}


@pytest.fixture(scope="module")
def reference_run(synthetic_stores, tmp_path_factory):
  """The GRU trained uninterrupted on the 8 devices: (config, workdir, parameters)."""
  workdir = tmp_path_factory.mktemp("temporal_reference")
  config = temporal_config(workdir, **REFERENCE)
  _, params = trained(config, workdir / "run", synthetic_stores)
  return config, str(workdir / "run"), params


def test_a_temporal_model_learns_what_single_frames_cannot_tell(synthetic_stores,
                                                               tmp_path):
  config = temporal_config(tmp_path, **{**REFERENCE, "num_train_steps": 150,
                                        "log_every_steps": 50, "eval_every_steps": 150,
                                        "checkpoint_every_steps": 150})
  # One device: the steps of test_one_device_equals_eight, faster than eight here.
  trained(config, tmp_path / "gru", synthetic_stores, jax.devices()[:1])
  temporal_p_va = final_scores(tmp_path / "gru")["p_va"]
  # The best any linear function of a frame's own features does, fitted on the very
  # frames it is scored on (an optimistic bound for a frame-level model).
  store = synthetic_stores["eval"]
  rows = store.rows(0, len(store))
  features = np.concatenate([rows["embedding"], np.ones((len(rows), 1))], 1)
  fitted = features @ np.linalg.lstsq(features, rows["valence_arousal"], rcond=None)[0]
  frame_p_va = float(np.mean(losses.concordance_per_dimension(
      fitted, rows["valence_arousal"], np.ones(len(rows)))))
  assert temporal_p_va > 0.5 and frame_p_va < 0.1, (temporal_p_va, frame_p_va)


def test_resume_after_a_kill_equals_the_uninterrupted_run(synthetic_stores,
                                                          reference_run, tmp_path):
  config, reference_dir, uninterrupted = reference_run
  workdir = str(tmp_path / "killed")
  trainer = loop.TemporalTrainer(config, workdir, stores=synthetic_stores)
  train_fn, calls = trainer.train_fn, []

  def dies_at_step_6(state, batch):
    calls.append(1)
    if len(calls) == 6:  # step 5 is lost with the process
      raise KeyboardInterrupt
    return train_fn(state, batch)

  trainer.train_fn = dies_at_step_6
  with pytest.raises(KeyboardInterrupt):
    loop.train_and_evaluate(config, workdir, trainer)
  assert trainer.manager.latest_step() == 4
  _, resumed = trained(config, workdir, synthetic_stores)
  jax.tree.map(np.testing.assert_array_equal, resumed, uninterrupted)
  assert final_scores(workdir) == final_scores(reference_dir)


def test_one_device_equals_eight(synthetic_stores, reference_run, tmp_path):
  config, reference_dir, eight = reference_run
  _, one = trained(config, tmp_path / "one", synthetic_stores, jax.devices()[:1])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               one, eight)
  assert final_scores(tmp_path / "one")["p_mtl"] == pytest.approx(
      final_scores(reference_dir)["p_mtl"], abs=1e-5)


def test_non_finite_steps_are_skipped_then_stop_the_run(reference_run, tmp_path):
  embedding = np.full((40, DIM), np.nan, np.float32)
  stores = {"train": write_store(tmp_path / "nan", {"broken": (
      embedding, np.zeros((40, 2), np.float32))})}
  stores["eval"] = stores["train"]
  config = temporal_config(tmp_path, **{**REFERENCE, "max_nonfinite_steps_in_row": 3,
                                        "checkpoint_every_steps": 2})
  trainer = loop.TemporalTrainer(config, str(tmp_path / "run"), stores=stores)
  initial = jax.device_get(trainer.new_state().params)
  with pytest.raises(guards.NonFiniteLossError, match="broken from frame position"):
    loop.train_and_evaluate(config, str(tmp_path / "run"), trainer)
  trainer.manager.wait_until_finished()
  assert trainer.manager.latest_step() == 2  # a checkpoint of skipped steps only
  state = checkpoints.restore_checkpoint(trainer.manager, 2, trainer.abstract_state())
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), initial)


# ---------------------------------------------------------------------------------
# 3. Prediction.
# ---------------------------------------------------------------------------------


def test_predictions_per_video_equal_the_batched_pass_and_its_scores(
    synthetic_stores, reference_run):
  _, workdir, _ = reference_run
  store = synthetic_stores["eval"]
  predictor = prediction.restore_temporal_predictor(workdir, store.embedding_dim)
  table, scores = prediction.predict_store(predictor, store)
  assert len(table) == len(store)
  for video, name in enumerate(store.video_names):
    rows = store.video_rows(video)
    direct = prediction.predict_video(predictor, rows["embedding"])
    mine = table.video == name
    np.testing.assert_array_equal(table.frame[mine], rows["frame"])
    for task in ("expression", "au", "va"):
      np.testing.assert_allclose(getattr(table, task)[mine], direct[task], rtol=1e-5,
                                 atol=1e-6, err_msg=task)
  # Each frame scored once: the pass's scores are those of the per-frame table.
  from_table = frame_table.table_scores(table, 8)
  for key in ("p_va", "expr_f1", "au_f1", "p_mtl"):
    assert scores[key] == pytest.approx(from_table[key], abs=1e-6), key
  assert np.asarray(scores["expr_confusion"]).sum() == int(
      table.labels["expression_mask"].sum())


def test_the_command_trains_then_predicts_a_split(frame_stores, tmp_path, capsys):
  config, stores = frame_stores
  workdir, out = str(tmp_path / "run"), str(tmp_path / "out")
  overrides = [f"--config.{key}={config[section][name]}" for key in (
      "frame_run.workdir", "frame_run.data_dir", "embeddings.dir")
      for section, name in [key.split(".")]]
  overrides += [f"--config.{key}={value}" for key, value in {
      **REFERENCE, "model.dropout_rate": 0.0, "optimizer.warmup_steps": 1,
      "num_train_steps": 4}.items()]
  assert command.main(["--config", os.path.join(REPO, "configs", "temporal.py"),
                       "--workdir", workdir, *overrides]) == 0
  assert command.main(["--mode", "predict", "--workdir", workdir, "--source",
                       "tfds:validation", "--out", out]) == 0
  with open(os.path.join(out, "summary.json")) as f:
    summary = json.load(f)
  assert summary["frames"] == len(stores["eval"]) == 46
  assert summary["frame_step"] == stores["eval"].index["frame_step"]
  logged = final_scores(workdir)  # the evaluation of the same checkpoint in training
  assert summary["scores"] == pytest.approx(
      {k: v for k, v in logged.items() if isinstance(v, float)}, abs=1e-9)
  with open(os.path.join(out, "predictions.csv")) as f:
    predicted = f.read()
  assert len(predicted.splitlines()) == 1 + 46
  # The predict command with --temporal_workdir: the same predictions and scores.
  from affect_jax.inference import predict
  out_predict = str(tmp_path / "out_predict")
  assert predict.predict_main([
      "--workdir", config.frame_run.workdir, "--data_dir", config.frame_run.data_dir,
      "--temporal_workdir", workdir, "--source", "tfds:validation",
      "--out", out_predict]) == 0
  with open(os.path.join(out_predict, "predictions.csv")) as f:
    assert f.read() == predicted
  with open(os.path.join(out_predict, "summary.json")) as f:
    by_predict = json.load(f)
  assert by_predict["model"] == "temporal" and by_predict["workdir"] == workdir
  for key in ("p_mtl", "expr_f1", "au_f1", "p_va"):
    assert by_predict["scores"]["raw"][key] == pytest.approx(summary["scores"][key],
                                                            abs=1e-9)
  capsys.readouterr()
  assert command.main(["--mode", "compare", "--workdir", workdir,
                       "--replicates", "20"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert [line.split(":")[0] for line in lines] == ["expr_f1", "au_f1", "p_va", "p_mtl"]
  assert f"temporal {logged['p_mtl']:.4f}, frame " in lines[-1]
  assert lines[-1].endswith("over 2 videos): within noise") or lines[-1].endswith(
      "over 2 videos): clear of noise")


def labelled_table(rng, videos, quality: float) -> frame_table.FrameTable:
  """Predictions that are the labels with probability `quality`, else noise."""
  names = np.repeat([f"v{i}" for i in range(len(videos))], videos)
  n = len(names)
  expression = rng.integers(0, 8, n)
  au = (rng.random((n, 12)) < 0.3).astype(np.float32)
  va = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
  right = rng.random(n) < quality
  guess = np.where(right, expression, rng.integers(0, 8, n))
  probabilities = np.full((n, 8), 0.02, np.float32)
  probabilities[np.arange(n), guess] = 0.86
  au_p = np.where(right[:, None], 0.1 + 0.8 * au, rng.random((n, 12))).astype(np.float32)
  va_p = np.where(right[:, None], va, rng.uniform(-1, 1, (n, 2))).astype(np.float32)
  labels = {"expression": expression.astype(np.int32),
            "expression_mask": np.ones(n, np.float32), "au": au,
            "au_mask": np.ones((n, 12), np.float32), "valence_arousal": va,
            "va_mask": np.ones(n, np.float32)}
  return frame_table.FrameTable(names, np.arange(n, dtype=np.int32),
                                np.full(n, "", str), np.full(n, -1, np.int32),
                                probabilities, au_p, va_p, labels)


def test_paired_bootstrap_over_videos_tells_a_real_difference_from_noise():
  rng = np.random.default_rng(0)
  videos = [30, 50, 20, 40, 35, 25, 45, 30]
  tables = {name: labelled_table(rng, videos, quality) for name, quality in
            (("good", 0.8), ("weak", 0.3), ("weak_again", 0.3))}
  statistics = compare.common_videos({name: compare.per_video_statistics(table, 8)
                                      for name, table in tables.items()})
  # Per-video statistics add up to the exact scores of the whole table.
  whole = frame_table.table_scores(tables["good"], 8)
  for key in ("p_va", "expr_f1", "au_f1", "au_f1_best_thresholds", "p_mtl"):
    assert compare.mean_score([statistics["good"]], key) == pytest.approx(
        whole[key], abs=1e-9), key
  clear = compare.paired_difference([statistics["good"]], [statistics["weak"]],
                                    "p_mtl", replicates=200)
  assert clear["clear"] and 0 < clear["low"] < clear["difference"] < clear["high"]
  noise = compare.paired_difference([statistics["weak_again"]], [statistics["weak"]],
                                    "p_mtl", replicates=200)
  assert not noise["clear"] and noise["low"] < 0 < noise["high"]
  same = compare.paired_difference([statistics["weak"]], [statistics["weak"]], "p_va",
                                   replicates=50)
  assert same["difference"] == same["low"] == same["high"] == 0.0
  # Several runs (seeds) of a model: the mean of their scores.
  seeds = compare.paired_difference([statistics["weak"], statistics["weak_again"]],
                                    [statistics["good"]], "expr_f1", replicates=50)
  assert seeds["a"] == pytest.approx(np.mean([compare.mean_score(
      [statistics[n]], "expr_f1") for n in ("weak", "weak_again")]))
  assert "difference -" in compare.format_difference(seeds)


def test_a_bad_temporal_config_is_named(tmp_path):
  config = temporal_config(tmp_path, **{"model.kind": "lstm", "window.eval_stride": 9,
                                        "window.padding": "mirror"})
  with pytest.raises(InputError) as error:
    loop.validate_config(config)
  assert str(error.value).splitlines()[1:] == [
      "  model.kind='lstm'; expected one of ('gru', 'transformer')",
      "  window.eval_stride=9 must be in 1..window.length (8)",
      "  window.padding='mirror'; expected one of ('edge', 'zeros')"]
