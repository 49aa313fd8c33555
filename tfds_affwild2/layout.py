"""Where the files of an ABAW release are: task folders, splits, image roots, MTL files.

Detection is automatic for every generation (ABAW1/2 `*_Set`, ABAW3-5 `*_Challenge`,
ABAW6+ `EXPR_Recognition_Challenge`, one or several `cropped_aligned*` image roots,
s-Aff-Wild2 MTL files). Releases unpacked into odd places can be described by hand
with `ReleaseLayout` (the build command's `--layout` JSON does that).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping

from tfds_affwild2.errors import MissingReleasePartError, ReleaseError

# Folder names each task has had, newest first.
TASK_FOLDER_NAMES = {
    "va": ("VA_Estimation_Challenge", "VA_Set"),
    "expr": ("EXPR_Recognition_Challenge", "EXPR_Classification_Challenge", "EXPR_Set"),
    "au": ("AU_Detection_Challenge", "AU_Set"),
}
SPLIT_FOLDER_NAMES = {
    "train": ("Train_Set", "Training_Set"),
    "validation": ("Validation_Set",),
}
MTL_FILE_NAMES = {
    "train": ("training_set_annotations.txt", "train_set.txt"),
    "validation": ("validation_set_annotations.txt", "validation_set.txt"),
}
IMAGE_ROOT_PREFIX = "cropped_aligned"
TEST_LIST_MARKER = "test_set"
SEARCH_DEPTH = 3  # releases are often unpacked one or two folders down


@dataclasses.dataclass(frozen=True)
class ReleaseLayout:
  """Absolute paths of one release's parts; empty fields mean "not in this release"."""
  root: str
  # task -> split -> folder of `<video>.txt` files
  task_split_dirs: Mapping[str, Mapping[str, str]] = dataclasses.field(
      default_factory=dict)
  image_roots: tuple[str, ...] = ()
  mtl_files: Mapping[str, str] = dataclasses.field(default_factory=dict)
  test_lists: tuple[str, ...] = ()

  def describe(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def _walk_dirs(root: str, max_depth: int):
  """Yields (path, name, is_dir) breadth first down to max_depth, sorted for determinism."""
  frontier = [(root, 0)]
  while frontier:
    folder, depth = frontier.pop(0)
    try:
      entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
      continue
    for entry in entries:
      is_dir = entry.is_dir()
      yield entry.path, entry.name, is_dir, depth
      # Never descend into image roots: they hold hundreds of thousands of files.
      if is_dir and depth < max_depth and not entry.name.startswith(IMAGE_ROOT_PREFIX):
        frontier.append((entry.path, depth + 1))


def find_release_layout(root: str | os.PathLike, max_depth: int = SEARCH_DEPTH
                        ) -> ReleaseLayout:
  """Finds every known part of a release below `root` (see module docstring)."""
  root = os.path.abspath(os.fspath(root))
  if not os.path.isdir(root):
    raise MissingReleasePartError(f"release folder {root} (manual_dir) does not exist")
  task_dirs: dict[str, dict[str, str]] = {}
  image_roots, test_lists = [], []
  mtl_files: dict[str, str] = {}
  task_of_folder = {name: task for task, names in TASK_FOLDER_NAMES.items()
                    for name in names}
  rank = {name: i for names in TASK_FOLDER_NAMES.values() for i, name in enumerate(names)}
  for path, name, is_dir, _ in _walk_dirs(root, max_depth):
    if is_dir and name.startswith(IMAGE_ROOT_PREFIX):
      image_roots.append(path)
    elif is_dir and name in task_of_folder:
      task = task_of_folder[name]
      current = task_dirs.get(task, {}).get("_folder")
      if current is not None and rank[os.path.basename(current)] <= rank[name]:
        continue  # a newer generation of the same task was already found
      splits = {split: os.path.join(path, candidate)
                for split, candidates in SPLIT_FOLDER_NAMES.items()
                for candidate in candidates if os.path.isdir(os.path.join(path, candidate))}
      if splits:
        task_dirs[task] = {"_folder": path, **splits}
    elif not is_dir and name.endswith(".txt"):
      for split, names in MTL_FILE_NAMES.items():
        if name in names and split not in mtl_files:
          mtl_files[split] = path
      if TEST_LIST_MARKER in name.lower():
        test_lists.append(path)
  for splits in task_dirs.values():
    splits.pop("_folder")
  return ReleaseLayout(root=root, task_split_dirs=task_dirs,
                       image_roots=tuple(sorted(image_roots)), mtl_files=mtl_files,
                       test_lists=tuple(test_lists))


def layout_with_overrides(layout: ReleaseLayout, overrides: Mapping) -> ReleaseLayout:
  """Replaces parts of a detected layout; relative paths are taken from the root.

  `overrides` has ReleaseLayout's field names, e.g.
  {"image_roots": ["faces"], "task_split_dirs": {"va": {"train": "va/tr"}}}.
  """
  unknown = set(overrides) - {f.name for f in dataclasses.fields(ReleaseLayout)} - {"root"}
  if unknown:
    raise ReleaseError(f"unknown layout override keys {sorted(unknown)}")

  def resolve(p: str) -> str:
    return p if os.path.isabs(p) else os.path.join(layout.root, p)

  changes = {}
  if "image_roots" in overrides:
    changes["image_roots"] = tuple(resolve(p) for p in overrides["image_roots"])
  if "test_lists" in overrides:
    changes["test_lists"] = tuple(resolve(p) for p in overrides["test_lists"])
  if "mtl_files" in overrides:
    changes["mtl_files"] = {s: resolve(p) for s, p in overrides["mtl_files"].items()}
  if "task_split_dirs" in overrides:
    changes["task_split_dirs"] = {
        t: {s: resolve(p) for s, p in splits.items()}
        for t, splits in overrides["task_split_dirs"].items()}
  for paths in [changes.get("image_roots", ()), *(
      d.values() for d in changes.get("task_split_dirs", {}).values())]:
    for p in paths:
      if not os.path.isdir(p):
        raise MissingReleasePartError(f"layout override names a missing folder: {p}")
  return dataclasses.replace(layout, **changes)
