"""The ONNX graph written from a model's parameters (affect_jax.video.onnx_graph) gives
JAX's probabilities and VA within 1e-4 under onnxruntime, for the tiny config and a
full-width ResNet-18, any batch; `affect-jax export --onnx` writes it and the Analyzer
runs from it; a network the writer does not know is refused by name."""
import csv
import dataclasses
import functools
import json
import os

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from affect_jax import cli
from affect_jax.errors import InputError
from affect_jax.model.multitask import MultiTaskNet
from affect_jax.video import analyzer as analyzer_lib
from affect_jax.video import export, onnx_export, onnx_graph

SIZE = 112
TASKS = ["au", "expression", "va"]  # the order of export's metadata["outputs"]


@pytest.fixture(scope="module")
def face_images():
  """Five 112x112 crops of scikit-image's astronaut (a face, a shoulder, the flag...)."""
  from skimage import data
  photo = data.astronaut()
  corners = [(0, 120), (20, 160), (150, 40), (250, 250), (300, 0)]
  return np.stack([cv2.resize(photo[y:y + 200, x:x + 200], (SIZE, SIZE),
                              interpolation=cv2.INTER_AREA) for y, x in corners])


def trained_looking_variables(network: MultiTaskNet, seed: int = 0) -> dict:
  """Variables of the network's shapes drawn with NumPy (no initialisation run): He
  normal kernels, and BatchNorm's scales, biases and running statistics away from their
  initial 1 and 0 (else folding them would change nothing)."""
  shapes = jax.eval_shape(functools.partial(network.init, train=False),
                          jax.random.key(seed), jnp.zeros((1, SIZE, SIZE, 3)))
  rng = np.random.default_rng(seed)
  draws = {"mean": lambda shape: rng.normal(0, 0.3, shape),
           "var": lambda shape: rng.uniform(0.5, 2.0, shape),
           "scale": lambda shape: rng.uniform(0.5, 1.5, shape),
           "bias": lambda shape: rng.normal(0, 0.1, shape),
           "kernel": lambda shape: rng.normal(0, kernel_scale(shape), shape)}

  def drawn(path, leaf):
    if path[-2].key == "bn2" and path[-1].key == "scale":  # residual branches small,
      return rng.uniform(0.1, 0.4, leaf.shape).astype(np.float32)  # as trained ones
    return draws[path[-1].key](leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(drawn, shapes)


def kernel_scale(shape) -> float:
  """He normal's for convolutions, LeCun normal's (flax's) for Dense kernels."""
  fan_in = np.prod(shape[:-1])
  return np.sqrt((2 if len(shape) == 4 else 1) / fan_in)


def jax_outputs(network: MultiTaskNet, variables: dict, images: np.ndarray) -> dict:
  """What the exported JAX function computes (export.forward)."""
  return jax.jit(functools.partial(export.forward, variables, network.apply,
                                   dtype=jnp.float32))(images)


NETWORKS = {
    "tiny": MultiTaskNet(stage_sizes=(1, 1, 1, 1), num_filters=8),
    "resnet18": MultiTaskNet(stage_sizes=(2, 2, 2, 2), num_filters=64),
    "hidden_heads_two_tasks": MultiTaskNet(tasks=("va", "expression"),
                                           num_expr_classes=7, head_hidden_dim=16,
                                           stage_sizes=(1, 2), num_filters=8),
}


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_the_onnx_graph_gives_jax_s_outputs(name, face_images, tmp_path):
  network = NETWORKS[name]
  variables = trained_looking_variables(network)
  ours = jax_outputs(network, variables, face_images)
  tasks = [task for task in TASKS if task in network.tasks]
  model = onnx_graph.network_model(variables, SIZE, tasks)
  path = str(tmp_path / "model.onnx")
  with open(path, "wb") as f:
    f.write(model.SerializeToString())
  predict = onnx_export.session_predict(onnx_export.onnx_session(path))
  for batch in (5, 2):  # one file, any batch
    theirs = predict(face_images[:batch])
    assert sorted(theirs) == sorted(tasks)
    for task in tasks:
      assert theirs[task].shape == ours[task][:batch].shape
      np.testing.assert_allclose(theirs[task], np.asarray(ours[task])[:batch],
                                 atol=1e-4, rtol=0, err_msg=f"{name} {task}")
  # Outputs that depend on the image, VA not saturated: the comparison is not
  # between constants.
  for task in tasks:
    assert np.ptp(np.asarray(ours[task]), axis=0).min() > 1e-3, task
  assert np.abs(np.asarray(ours["va"])).max() < 0.995


def test_a_network_the_writer_does_not_know_is_refused_by_name(tmp_path):
  variables = trained_looking_variables(NETWORKS["tiny"])
  variables["params"]["backbone"]["layer1_0"]["conv3"] = {
      "kernel": np.zeros((1, 1, 8, 32), np.float32)}  # a bottleneck block's
  with pytest.raises(InputError, match=r"would not use \(params/backbone/layer1_0/"
                     r"conv3/kernel\).*covers the multi-task ResNet"):
    onnx_export.write_onnx(variables, SIZE, TASKS, str(tmp_path), reference=None)
  assert not os.listdir(tmp_path)
  del variables["params"]["backbone"]["layer1_0"]["conv3"]
  del variables["params"]["au_head"]
  with pytest.raises(InputError, match="no parameter params/au_head/output/kernel"):
    onnx_graph.network_model(variables, SIZE, TASKS)


def test_export_writes_onnx_that_the_analyzer_runs(uninterrupted_run, face_images,
                                                   tmp_path, monkeypatch, capsys):
  from skimage import data
  _, workdir = uninterrupted_run("xla")
  out = str(tmp_path / "export")
  assert cli.main(["export", "--workdir", workdir, "--out", out, "--platforms", "cpu",
                   "--onnx"]) == 0
  capsys.readouterr()
  with open(os.path.join(out, "model.json")) as f:
    metadata = json.load(f)
  assert metadata["onnx"]["file"] == "model.onnx"
  assert metadata["onnx"]["max_abs_difference_from_jax"] <= 1e-4
  exported, _ = export.load_export(out)
  ours = exported.call(face_images)
  theirs = onnx_export.run_onnx(os.path.join(out, "model.onnx"), face_images)
  for task, values in zip(metadata["outputs"], theirs):
    np.testing.assert_allclose(values, np.asarray(ours[task]), atol=1e-4, rtol=0)
  # The Analyzer from the ONNX file finds and predicts the astronaut as from JAX's.
  rows = [analyzer_lib.Analyzer.from_export(out, batch_size=4, runtime=runtime)
          .analyze_image(data.astronaut()).rows for runtime in ("jax", "onnx")]
  assert len(rows[1]) == len(rows[0]) == 1
  assert rows[1][0].box == rows[0][0].box
  for task in ("expression", "au", "va"):
    np.testing.assert_allclose(getattr(rows[1][0], task), getattr(rows[0][0], task),
                               atol=1e-4, rtol=0)
  # The faces command runs the export as well, without the training run.
  photo = tmp_path / "astronaut.png"
  Image.fromarray(data.astronaut()).save(photo)
  faces_out = tmp_path / "faces"
  assert cli.main(["faces", "--export", out, "--runtime", "onnx", "--input", str(photo),
                   "--out", str(faces_out), "--batch_size", "4"]) == 0
  capsys.readouterr()
  with open(faces_out / "faces.csv", newline="") as f:
    row, = csv.DictReader(f)
  np.testing.assert_allclose([float(row["valence"]), float(row["arousal"])],
                             rows[1][0].va, atol=1e-5)
  assert cli.main(["faces", "--export", out, "--workdir", workdir, "--input", str(photo),
                   "--out", str(faces_out)]) == 1
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      "error: give the model as --workdir (a training run) or --export (a folder "
      "`affect-jax export` wrote), one of the two")
  os.remove(os.path.join(out, "model.onnx"))
  with pytest.raises(InputError, match=r"model.onnx does not exist: `affect-jax "
                     "export --onnx` writes it"):
    analyzer_lib.Analyzer.from_export(out, runtime="onnx")
  # A network the writer does not know: one error line, after the jax.export files.
  restored_network = export.restored_network

  def with_an_unknown_layer(*args, **kwargs):
    network = restored_network(*args, **kwargs)
    params = dict(network.variables["params"])
    params["extra_head"] = {"output": {"kernel": np.zeros((64, 3), np.float32)}}
    return dataclasses.replace(network, variables={**network.variables,
                                                   "params": params})

  monkeypatch.setattr(export, "restored_network", with_an_unknown_layer)
  other = str(tmp_path / "other")
  assert cli.main(["export", "--workdir", workdir, "--out", other, "--platforms", "cpu",
                   "--onnx"]) == 1
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      "error: ONNX export: the network has parameters the ONNX graph would not use "
      "(params/extra_head/output/kernel): " + onnx_graph.UNSUPPORTED)
  assert sorted(os.listdir(other)) == ["model.jax_export", "model.json"]
