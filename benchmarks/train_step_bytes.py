"""Where the train step's bytes go on a TPU, compiled ahead of time on this host.

Compiles the trainer's train step (as `affect-jax compile` does) for one topology and
per-chip batch, prints XLA's FLOPs, bytes accessed and HBM per image, and then the
optimised program's top-level operations by the bytes they read and write (operands
plus result), grouped by the JAX operation they come from: the breakdown behind
docs/ACCELERATORS.md, "Bytes per image". Operation bytes are summed from the HLO text's
shapes, so they only approximate the cost model's total.

  python benchmarks/train_step_bytes.py \
      --topology v5e:2x2 --batch 1024 [--config configs/default.py] [--top 25]
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys

ITEM_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "s8": 1, "u8": 1, "pred": 1,
              "s32": 4, "u32": 4, "s64": 8, "u64": 8}
SHAPE = re.compile(r"\b(" + "|".join(ITEM_BYTES) + r")\[([\d,]*)\]")
INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s+=\s+(.*?)\s+([\w\-]+)\((.*)$")
NOT_TRAFFIC = {"tuple", "get-tuple-element", "bitcast", "parameter", "constant",
               "after-all"}


def shape_bytes(text: str) -> int:
  total = 0
  for dtype, dims in SHAPE.findall(text):
    count = 1
    for dim in filter(None, dims.split(",")):
      count *= int(dim)
    total += count * ITEM_BYTES[dtype]
  return total


def entry_operations(hlo_text: str):
  """(bytes read + written, opcode, JAX op name) per top-level instruction."""
  lines = hlo_text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("ENTRY"))
  shapes = {}
  for line in lines[start + 1:]:
    if line.startswith("}"):
      break
    match = INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, opcode, rest = match.groups()
    shapes[name] = shape
    if opcode in NOT_TRAFFIC:
      continue
    operands = re.findall(r"%([\w.\-]+)", re.split(r", (?:kind|calls|metadata)=", rest)[0])
    read = 0 if opcode.endswith("-done") else sum(shape_bytes(shapes.get(o, ""))
                                                  for o in operands)
    written = 0 if opcode.endswith("-start") else shape_bytes(shape)
    op_name = re.search(r'op_name="([^"]*)"', line)
    yield read + written, opcode, op_name.group(1) if op_name else opcode


def group_name(op_name: str) -> str:
  """jit(train_step)/shard_map/transpose(jvp(MultiTaskNet))/backbone/bn1/... ->
  'backward backbone/bn1/...' (forward, backward or the rest)."""
  parts = op_name.split("/")
  direction = ("backward" if any(p.startswith("transpose(") for p in parts) else
               "forward" if any(p.startswith("jvp(") for p in parts) else "")
  kept = [p for p in parts if not p.startswith(("jit(", "shard_map", "transpose(",
                                                "jvp("))]
  return " ".join(filter(None, [direction, re.sub(r"\d+", "#", "/".join(kept[-3:]))]))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--batch", type=int, default=1024, help="images per chip")
  parser.add_argument("--config", default="configs/default.py")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--top", type=int, default=25)
  args = parser.parse_args()

  from affect_jax.aot import command  # pylint: disable=g-import-not-at-top
  command.keep_jax_on_cpu()
  from affect_jax.aot import analysis  # pylint: disable=g-import-not-at-top
  from affect_jax.aot.topology import create_topology  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import bench_common  # pylint: disable=g-import-not-at-top
  config = bench_common.load_config(args.config)
  config.model.dtype = args.dtype
  topology = create_topology(args.topology)
  steps = analysis.build_steps(config, topology)
  lowered = steps.train.lower(steps.state, analysis.abstract_batch(
      topology, args.batch, config.input.image_size))
  compiled = lowered.compile()
  cost = analysis.step_cost(lowered, compiled)
  hbm = analysis.hbm_bytes_used(compiled.memory_analysis())
  print(f"{args.topology}, {args.batch} images per chip: "
        f"{cost['flops'] / args.batch / 1e9:.3f} GFLOP, "
        f"{cost['bytes accessed'] / args.batch / 1e6:.2f} MB per image, "
        f"HBM used {hbm / 1e9:.2f} GB")
  groups = collections.Counter()
  for size, _, op_name in entry_operations(compiled.as_text()):
    groups[group_name(op_name)] += size
  total = sum(groups.values()) / args.batch / 1e6
  print(f"top-level operations, MB per image (of {total:.2f}):")
  for name, size in groups.most_common(args.top):
    print(f"  {size / args.batch / 1e6:7.2f}  {name}")


if __name__ == "__main__":
  main()
