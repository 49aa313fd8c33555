"""A trained model as a portable, serialised function (jax.export: StableHLO with the
weights inside): uint8 face images in, the three tasks out; it runs without the
training code, the config or the checkpoint (the export command).

  affect-jax export --workdir runs/mtl --out runs/mtl/export [--step N] [--onnx]
  (or python -m affect_jax.video.export ...)

Writes OUT/model.jax_export (jax.export's serialisation: images uint8 [batch, size,
size, 3], any batch, RGB faces aligned as ABAW's cropped_aligned images -> a dict of
"expression" probabilities [batch, classes], "au" probabilities [batch, 12], "va"
[batch, 2], whichever tasks the model has) and OUT/model.json (the image size, the
class and AU names, the AU thresholds, where it came from). The network is written
with XLA's own layers (the "xla" implementation, no foreign calls), lowered for CPU and
CUDA. To run it with JAX alone:

  exported = jax.export.deserialize(open("model.jax_export", "rb").read())
  outputs = exported.call(images)

and Analyzer.from_export(OUT) analyses photos and videos with it. `--onnx` also writes
OUT/model.onnx (affect_jax.video.onnx_export), which Analyzer.from_export(OUT,
runtime="onnx") runs with onnxruntime.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np
from absl import flags

from affect_jax import cli, cli_logging, vocabulary
from affect_jax.errors import InputError

EXPORT_FILE = "model.jax_export"
METADATA_FILE = "model.json"
PLATFORMS = ("cpu", "cuda")


def forward(variables, apply_fn, images, *, dtype):
  """uint8 images -> probabilities and VA, as the predict step computes them."""
  from affect_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from affect_jax.train.step_functions import task_probabilities  # noqa: PLC0415
  return task_probabilities(
      apply_fn(variables, pipeline.normalize_images(images, dtype), train=False))


@dataclasses.dataclass(frozen=True)
class RestoredNetwork:
  """A run's checkpoint in evaluation mode: its variables ({"params", "batch_stats"}
  as NumPy arrays), the network in XLA's own layers, its image size, step and config."""
  variables: dict
  apply_fn: Callable
  image_size: int
  step: int
  config: Any

  def forward(self, dtype_name: str | None = None) -> Callable:
    """uint8 images -> outputs, the weights as constants; computed in the config's
    dtype, or in `dtype_name`."""
    import ml_collections  # pylint: disable=g-import-not-at-top
    from affect_jax.model import multitask  # pylint: disable=g-import-not-at-top
    dtype_name = dtype_name or self.config.model.dtype
    apply_fn = self.apply_fn
    if dtype_name != self.config.model.dtype:
      model_config = ml_collections.ConfigDict(self.config.model.to_dict())
      model_config.dtype = dtype_name
      apply_fn = multitask.create_model(model_config, "xla", axis_name=None).apply
    return functools.partial(forward, self.variables, apply_fn,
                             dtype=multitask.DTYPES[dtype_name])


def restored_network(workdir: str, step: int | None = None,
                     config=None) -> RestoredNetwork:
  """Checkpoint `step` (default: the best, else the latest) of a run, the network in
  XLA's own layers."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from affect_jax import data_parallel  # pylint: disable=g-import-not-at-top
  from affect_jax.inference import restore  # pylint: disable=g-import-not-at-top
  from affect_jax.train import checkpoints  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(restore.load_config(workdir, config).to_dict())
  config.model.implementation = "xla"  # portable: no foreign calls in the program
  mesh = data_parallel.create_mesh(jax.devices()[:1])
  state = checkpoints.restore_for_eval(config, workdir, mesh, step)
  variables = jax.tree.map(np.asarray, {"params": state.params["model"],
                                        "batch_stats": state.batch_stats})
  return RestoredNetwork(variables, state.apply_fn, int(config.input.image_size),
                         int(state.step), config)


def images_spec(size: int):
  """uint8 [batch, size, size, 3], the batch symbolic (any batch at run time)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"batch, {size}, {size}, 3"),
                              np.uint8)


def export_run(workdir: str, out_dir: str, step: int | None = None, config=None,
               platforms: Sequence[str] = PLATFORMS,
               use_tuned_thresholds: bool = True, onnx: bool = False) -> dict:
  """Exports checkpoint `step` (default: the best, else the latest) of a run; returns
  the metadata written beside it. `onnx`: also OUT/model.onnx
  (affect_jax.video.onnx_export)."""
  import jax  # pylint: disable=g-import-not-at-top
  from affect_jax.inference import tuning  # pylint: disable=g-import-not-at-top
  network = restored_network(workdir, step, config)
  function, size, step, config = (network.forward(), network.image_size, network.step,
                                  network.config)
  exported = jax.export.export(jax.jit(function), platforms=tuple(platforms))(
      images_spec(size))
  thresholds, origin = tuning.au_thresholds_for(workdir, step, 1, use_tuned_thresholds)
  metadata = {
      "format": "jax.export", "file": EXPORT_FILE, "image_size": size,
      "input": "uint8 [batch, size, size, 3] RGB faces aligned as ABAW's "
               "cropped_aligned images",
      "outputs": sorted(exported.out_tree.unflatten(range(len(exported.out_avals)))),
      "expression_names": list(vocabulary.expression_names(
          int(config.model.num_expr_classes))),
      "au_names": list(vocabulary.AU_NAMES),
      "au_thresholds": [float(t) for t in thresholds], "au_thresholds_from": origin,
      "platforms": list(platforms), "workdir": os.path.abspath(workdir),
      "step": step, "jax_version": jax.__version__}
  os.makedirs(out_dir, exist_ok=True)
  try:
    serialised = exported.serialize()
  except ImportError as error:  # jax serialises with flatbuffers, not a jax dependency
    raise InputError(f"writing a jax.export file needs flatbuffers ({error}): pip "
                     "install flatbuffers") from None
  with open(os.path.join(out_dir, EXPORT_FILE), "wb") as f:
    f.write(serialised)
  write_metadata(out_dir, metadata)
  if onnx:  # after the jax.export files, which stand whatever ONNX conversion does
    import affect_jax.video.onnx_export as onnx_export  # pylint: disable=g-import-not-at-top
    metadata["onnx"] = onnx_export.write_onnx(
        network.variables, size, metadata["outputs"], out_dir,
        jax.jit(network.forward("float32")))
    write_metadata(out_dir, metadata)
  return metadata


def write_metadata(out_dir: str, metadata: dict) -> str:
  path = os.path.join(out_dir, METADATA_FILE)
  with open(path, "w") as f:
    json.dump(metadata, f, indent=2)
  return path


def load_metadata(out_dir: str) -> dict:
  """OUT/model.json."""
  path = os.path.join(out_dir, METADATA_FILE)
  if not os.path.isfile(path):
    raise InputError(f"{path} does not exist: `affect-jax export` writes it")
  with open(path) as f:
    try:
      return json.load(f)
    except ValueError as error:
      raise InputError(f"{path}: not JSON: {error}") from None


def load_export(out_dir: str):
  """(the deserialised jax.export.Exported, its metadata)."""
  import jax  # pylint: disable=g-import-not-at-top
  paths = [os.path.join(out_dir, name) for name in (EXPORT_FILE, METADATA_FILE)]
  for path in paths:
    if not os.path.isfile(path):
      raise InputError(f"{path} does not exist: `affect-jax export` writes it")
  metadata = load_metadata(out_dir)
  with open(paths[0], "rb") as f:
    try:
      exported = jax.export.deserialize(bytearray(f.read()))
    except Exception as error:  # pylint: disable=broad-except  # any decoding failure
      raise InputError(f"{paths[0]}: not a jax.export serialisation: {error}") from None
  return exported, metadata


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "The training run's folder.",
                      flag_values=flag_values)
  flags.DEFINE_string("out", None, "Output folder.", flag_values=flag_values)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: best, else latest).",
                       flag_values=flag_values)
  flags.DEFINE_list("platforms", list(PLATFORMS), "Platforms to lower for.",
                    flag_values=flag_values)
  flags.DEFINE_bool("onnx", False, "Also write OUT/model.onnx (pip install "
                    "'affect-jax[onnx]'), checked against JAX with onnxruntime.",
                    flag_values=flag_values)
  flags.DEFINE_bool("tuned_au_thresholds", True, "Record <workdir>/au_thresholds.json "
                    "when it was tuned for this checkpoint.", flag_values=flag_values)
  flags.mark_flags_as_required(["workdir", "out"], flag_values=flag_values)


def main(argv: Sequence[str] | None = None) -> int:
  args, _ = cli.parse_flags(argv, define_flags, __doc__)
  cli_logging.start_console_logging()
  metadata = export_run(args.workdir, args.out, args.step, platforms=args.platforms,
                        use_tuned_thresholds=args.tuned_au_thresholds, onnx=args.onnx)
  print(json.dumps(metadata, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_as_script(main))
