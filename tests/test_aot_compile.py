"""`affect-jax compile` (affect_jax.aot): the real steps compiled ahead of time for a
TPU topology this host does not have and for host CPU devices; the report's figures
against independent counts; a step that does not fit; the largest-batch search's
bracket and its compile count; the parsers of compiler output.

Full compiles are few (each takes a minute or more on two cores): the default config's
train step once for a 16-chip, 4-host v5e topology, and the tiny config for the rest.
"""
import json
import math
import os

import pytest

from affect_jax.aot import analysis, chips, command, gpu, search
from configs import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "default.py")
TINY_CONFIG = os.path.join(REPO, "configs", "tiny.py")

STEP_KEYS = {"chip", "chips", "hosts", "per_chip_batch", "hbm_bytes_used",
             "hbm_bytes_total", "hbm_bytes_usable", "flops_per_image",
             "bytes_per_image", "roofline_images_per_s_per_chip", "bound", "hlo_ops",
             "epoch_seconds_1_chip", "epoch_seconds_8_chips", "on_paper"}
SEARCH_KEYS = {"largest_per_chip_batch", "smallest_failing_per_chip_batch",
               "search_compiles", "at_largest_batch"}


def compile_command(tmp_path, *args) -> tuple[int, dict | None]:
  out = tmp_path / "report.json"
  status = command.main([*args, "--out", str(out)])
  return status, (json.loads(out.read_text()) if out.exists() else None)


def resnet_conv_macs(stage_sizes, filters: int, image_size: int) -> int:
  """Multiply-adds of a ResNet's convolutions (basic blocks, torchvision's layout) for
  one image: the stem's 7x7/2, the 3x3/2 max-pool, 3x3 convolutions, 1x1 projections."""
  size = math.ceil(image_size / 2)
  macs = size * size * filters * 7 * 7 * 3
  size = math.ceil(size / 2)
  channels = filters
  for stage, blocks in enumerate(stage_sizes):
    width = filters * 2**stage
    for block in range(blocks):
      stride = 2 if stage > 0 and block == 0 else 1
      out = math.ceil(size / stride)
      macs += out * out * width * 9 * (channels + width)
      if stride != 1 or channels != width:
        macs += out * out * width * channels
      size, channels = out, width
  return macs


@pytest.fixture(scope="module")
def multi_host_report(tmp_path_factory):
  """The default config's train step in bfloat16 on v5e:4x4 (16 chips, 4 hosts)."""
  status, report = compile_command(
      tmp_path_factory.mktemp("v5e"), "--config", DEFAULT_CONFIG, "--topology",
      "v5e:4x4", "--dtype", "bfloat16", "--steps", "train", "--no_search")
  assert status == 0
  return report


def test_the_default_train_step_compiles_for_a_multi_host_tpu_topology_and_fits(
    multi_host_report):
  report = multi_host_report
  train = report["steps"]["train"]
  assert (report["chips"], report["hosts"]) == (16, 4)
  assert (report["dtype"], report["implementation"]) == ("bfloat16", "xla")
  assert STEP_KEYS <= set(train)
  assert (train["chip"], train["chips"], train["hosts"]) == ("v5e", 16, 4)
  assert train["per_chip_batch"] == default.get_config().input.batch_size // 16
  v5e = chips.CHIPS["v5e"]
  assert train["hbm_bytes_total"] == v5e.hbm_bytes
  assert 0 < train["hbm_bytes_used"] <= train["hbm_bytes_usable"] < v5e.hbm_bytes


def test_the_report_agrees_with_independent_counts(multi_host_report):
  train = multi_host_report["steps"]["train"]
  config = default.get_config().model
  analytic = 3 * 2 * resnet_conv_macs(config.stage_sizes, config.num_filters, 112)
  assert analytic / 2 < train["flops_per_image"] < analytic * 2  # forward + backward
  # Each image is read at least once; the donated state is counted once.
  assert train["bytes_per_image"] > 112 * 112 * 3
  assert train["hbm_bytes_aliased"] > 0
  assert train["hbm_bytes_used"] == (
      train["hbm_bytes_arguments"] + train["hbm_bytes_outputs"]
      - train["hbm_bytes_aliased"] + train["hbm_bytes_temporaries"]
      + train["hbm_bytes_code"])
  v5e = chips.CHIPS["v5e"]
  compute = v5e.peak_flops / train["flops_per_image"]
  memory = v5e.hbm_bandwidth / train["bytes_per_image"]
  assert train["roofline_images_per_s_per_chip"] == pytest.approx(min(compute, memory))
  assert train["bound"] == ("compute" if compute <= memory else "memory")
  assert train["epoch_seconds_8_chips"] == pytest.approx(
      command.S_AFFWILD2_TRAIN_FRAMES / (8 * min(compute, memory)))
  assert 0 < train["hlo_ops"] and 0 < train["hlo_entry_ops"] < train["hlo_ops"]
  h100 = train["on_paper"]["h100"]
  assert h100["roofline_images_per_s_per_chip"] == pytest.approx(min(
      chips.CHIPS["h100"].peak_flops / train["flops_per_image"],
      chips.CHIPS["h100"].hbm_bandwidth / train["bytes_per_image"]))


def test_the_resident_dataset_arithmetic(multi_host_report):
  resident = multi_host_report["s_affwild2_resident"]
  used = multi_host_report["steps"]["train"]["hbm_bytes_used"]
  assert resident["dataset_bytes"] > command.S_AFFWILD2_TRAIN_FRAMES * 112 * 112 * 3
  assert set(resident["slices"]) == {"v5e-8", "v5e:4x4"}
  for fit in resident["slices"].values():
    share = math.ceil(resident["dataset_bytes"] / fit["chips"])
    assert fit["sharded_bytes_per_chip"] == share
    assert fit["fits_sharded"] == (used + share <= resident["hbm_bytes_usable"])
    assert fit["free_bytes_replicated"] == (
        resident["hbm_bytes_usable"] - used - resident["dataset_bytes"])


def test_a_step_that_does_not_fit_exits_non_zero_saying_what_it_needs(tmp_path, capsys):
  status, report = compile_command(tmp_path, "--config", TINY_CONFIG, "--topology",
                                   "v5e:2x2", "--steps", "train", "--batch_size",
                                   "200000", "--no_search")
  assert status == command.DOES_NOT_FIT and report is None
  message = capsys.readouterr().err.strip()
  assert "\n" not in message and "200000 images per chip" in message
  needed = float(message.split("needs ")[1].split(" GiB")[0])
  usable = chips.CHIPS["v5e"].usable_hbm_bytes / 2**30
  assert needed > usable and f"{usable:.2f} GiB" in message


def test_host_cpu_devices_compile_the_cpu_implementation(tmp_path):
  status, report = compile_command(tmp_path, "--config", TINY_CONFIG, "--topology",
                                   "cpu:8", "--no_search")
  assert status == 0
  assert (report["chips"], report["hosts"], report["implementation"]) == (8, 1, "cpu")
  for row in report["steps"].values():
    assert STEP_KEYS <= set(row)
    assert row["flops_per_image"] > 0 and row["bytes_per_image"] > 0
    assert 0 < row["hbm_bytes_used"] <= row["hbm_bytes_usable"]
    # No published peaks for a host CPU, and no accelerator to put its program on.
    assert row["roofline_images_per_s_per_chip"] is None and row["bound"] is None
    assert row["on_paper"] == {}
  assert report["steps"]["eval"]["flops_per_image"] < (
      report["steps"]["train"]["flops_per_image"])


def linear_memory(limit_batch: int, fixed: int = 1000, per_image: int = 10):
  """A step whose HBM use is fixed + per_image x batch on a chip that fits
  `limit_batch` images: (measure, usable bytes, batches compiled)."""
  usable = fixed + per_image * limit_batch
  compiled = []

  def measure(batch):
    compiled.append(batch)
    return search.Probe(batch, fixed + per_image * batch <= usable,
                        fixed + per_image * batch)

  return measure, usable, compiled


@pytest.mark.parametrize("limit", [7000, 1000, 130, 9])
def test_the_search_brackets_the_limit_within_its_compiles(limit):
  for max_compiles in (2, 4, 30):
    measure, usable, compiled = linear_memory(limit)
    first = measure(128)
    compiled.clear()
    result = search.search_largest_batch(measure, first, 1000, usable,
                                         max_compiles=max_compiles)
    assert result.compiles == len(compiled) <= max_compiles
    assert result.largest_fitting <= limit < result.smallest_failing
    assert result.smallest_failing <= 2 * result.largest_fitting  # a power-two bracket
    assert all(batch % 8 == 0 for batch in compiled)
    if max_compiles == 30:
      assert result.largest_fitting == limit // 8 * 8  # exact, on multiples of 8


def test_the_search_reports_when_nothing_fits():
  measure, usable, _ = linear_memory(3)
  result = search.search_largest_batch(measure, measure(64), 1000, usable)
  assert result.largest_fitting is None and result.smallest_failing == 8


def test_compiler_output_parsers():
  assert analysis.needed_and_available(
      "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
      "temporaries (160.00G) exceeds available HBM (15.75G).") == (
          160 * 2**30, int(15.75 * 2**30))
  assert analysis.needed_and_available("Used 20.5G of 15.75G hbm.")[0] == int(
      20.5 * 2**30)
  hlo = """HloModule m

%fused (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %n = f32[4]{0} negate(%p)
}

ENTRY %main (a: bf16[2,8]) -> bf16[2,4] {
  %a = bf16[2,8]{1,0} parameter(0)
  %w = bf16[8,4]{1,0} constant({...})
  %conv = (bf16[2,4]{1,0}, u8[64]{0}) custom-call(%a, %w), custom_call_target="gemm"
  ROOT %out = bf16[2,4]{1,0} get-tuple-element(%conv), index=0
}
"""
  assert analysis.count_hlo_instructions(hlo) == (6, 4)
  # The call's operands (32 + 64 bytes) and output (16), not its u8 workspace.
  assert gpu.custom_call_bytes(hlo) == 32 + 64 + 16


def test_the_resident_programs_dataset_is_the_one_the_loader_places():
  """The split the "resident" step compiles against (abstract: shapes and shardings
  only) has the shapes, dtypes, shardings and static fields of the one
  device_resident.load_split_to_device puts on the same mesh."""
  import jax
  import numpy as np
  from affect_jax.aot.topology import create_topology
  from affect_jax.data import device_resident
  from tests.test_device_data import _records
  topology = create_topology("cpu:8")
  loaded = device_resident.load_split_to_device(_records(21), topology.mesh,
                                                image_size=16)
  abstract = analysis.abstract_resident_dataset(topology, 21, 16)
  assert jax.tree.structure(abstract) == jax.tree.structure(loaded)
  for want, got in zip(jax.tree.leaves(abstract), jax.tree.leaves(loaded)):
    assert (want.shape, np.dtype(want.dtype)) == (got.shape, got.dtype)
    assert want.sharding.is_equivalent_to(got.sharding, len(want.shape))
