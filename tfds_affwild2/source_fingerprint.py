"""The fingerprint of the release a dataset is built from: changes whenever what the
build reads changes, computed without reading a single image.

It hashes the content of every annotation file the build reads (the per-task files or
the MTL files, as the builder config's source says, and the test lists) and the names
and sizes of the frame images in the image roots
(a listing: no image is opened). Paths enter relative to the release root, so a
release moved or copied elsewhere keeps its fingerprint. The builder stores it in the
dataset's metadata as "source_fingerprint"; a later build compares it with the
release it is given, and a resumed training run compares the datasets' fingerprints.
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterator

from tfds_affwild2.layout import ReleaseLayout

METADATA_KEY = "source_fingerprint"
READ_BLOCK = 1 << 20  # annotation files are hashed a block at a time


def _file_digest(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(READ_BLOCK), b""):
      digest.update(block)
  return digest.hexdigest()


def annotation_files(layout: ReleaseLayout, source: str = "per_task") -> list[str]:
  """The annotation files a build from `source` ("per_task" or "mtl") reads, sorted."""
  files = set(layout.test_lists)
  if source == "mtl":
    files.update(layout.mtl_files.values())
  else:
    for dirs in layout.task_split_dirs.values():
      for folder in dirs.values():
        files.update(os.path.join(folder, name) for name in os.listdir(folder)
                     if name.endswith(".txt"))
  return sorted(files)


def _is_frame_image(name: str) -> bool:
  stem, ext = os.path.splitext(name)
  return ext.lower() == ".jpg" and stem.isdigit()


def _image_listing(layout: ReleaseLayout) -> Iterator[str]:
  """`<root>/<video>/<name>\\t<size>` for each frame image, sorted."""
  for root in sorted(layout.image_roots):
    root_name = os.path.relpath(root, layout.root)
    videos = sorted((e for e in os.scandir(root) if e.is_dir()), key=lambda e: e.name)
    for video in videos:
      images = sorted((e for e in os.scandir(video.path) if _is_frame_image(e.name)),
                      key=lambda e: e.name)
      for image in images:
        yield f"{root_name}/{video.name}/{image.name}\t{image.stat().st_size}"


def source_fingerprint(layout: ReleaseLayout, source: str = "per_task") -> str:
  """A SHA-256 over the contents of the annotation files a build from `source` reads
  and the image files' names and sizes (see the module docstring), as hex."""
  digest = hashlib.sha256()
  for path in annotation_files(layout, source):
    digest.update(f"annotation\t{os.path.relpath(path, layout.root)}\t"
                  f"{_file_digest(path)}\n".encode("utf-8", "surrogateescape"))
  for line in _image_listing(layout):
    digest.update(f"image\t{line}\n".encode("utf-8", "surrogateescape"))
  return digest.hexdigest()
