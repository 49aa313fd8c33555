"""TFDS builder `affwild2`: an ABAW release (or the synthetic one) as ArrayRecord shards.

JPEG bytes are stored as they are on disk and every feature is given as NumPy values or
bytes, so building and reading need no TensorFlow.

The dataset's metadata (metadata.json in its folder) holds, besides the feature names:
"source_fingerprint" (the release it was built from, `source_fingerprint.py`), "summary"
(per split counts, `release.SplitSummary`), "annotated_au_names" (the AUs with at least
one 0/1 label: ABAW1's AU files annotate 8, of which 7 are among the 12) and
"videos_in_train_and_validation" (`release.SplitOverlap`, reported, not refused).
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import tensorflow_datasets as tfds

# Sibling modules by their full names: the package's __init__ imports this module.
import tfds_affwild2.annotations as annotations
import tfds_affwild2.layout as layout_lib
import tfds_affwild2.release as release
import tfds_affwild2.source_fingerprint as fingerprint_lib
from tfds_affwild2.errors import MissingReleasePartError

log = logging.getLogger(__name__)

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Aff-Wild2 is licensed under an EULA (https://ibug.doc.ic.ac.uk/resources/aff-wild2/):
request it from its authors, then point `manual_dir` (the build command's --manual_dir)
at the folder where you unpacked it. Any ABAW generation is detected:
  cropped_aligned/<video>/<frame>.jpg   (one or several cropped_aligned* image roots)
  VA_Set|VA_Estimation_Challenge/{Train_Set,Training_Set,Validation_Set}/<video>.txt
  EXPR_Set|EXPR_Classification_Challenge|EXPR_Recognition_Challenge/...
  AU_Set|AU_Detection_Challenge/...
  training_set_annotations.txt / validation_set_annotations.txt (s-Aff-Wild2, or the
  ABAW3 train_set.txt / validation_set.txt)  for the `mtl` config
  *test_set*.txt (video names or image paths)  for an images-only `test` split
  (every frame any list names, once)
No data? `python -m tfds_affwild2.synthetic --out DIR` writes a synthetic release in the
same layout.
"""


@dataclasses.dataclass
class Affwild2Config(tfds.core.BuilderConfig):
  """source: 'per_task' (union of the per-task files) or 'mtl' (s-Aff-Wild2 files)."""
  source: str = "per_task"
  num_expr_classes: int = 8


BUILDER_CONFIGS = [
    Affwild2Config(name="union", source="per_task", num_expr_classes=8,
                   description="Per-task annotations (ABAW3+) merged per frame, "
                               "8 expression classes."),
    Affwild2Config(name="abaw2", source="per_task", num_expr_classes=7,
                   description="Per-task annotations merged per frame, 7 expression "
                               "classes as in ABAW2 ('Other' masked out)."),
    Affwild2Config(name="mtl", source="mtl", num_expr_classes=8,
                   description="s-Aff-Wild2 multi-task annotation files (ABAW3/4/7)."),
]


class Affwild2(tfds.core.GeneratorBasedBuilder):
  """Aff-Wild2 face frames with expression, 12 AU and valence-arousal labels + masks."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = BUILDER_CONFIGS
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def __init__(self, *, layout_overrides: dict | None = None,
               fix_mismatched_images: bool = False, **kwargs):
    self._layout_overrides = layout_overrides or {}
    self._fix_mismatched_images = fix_mismatched_images
    self._release: dict = {}  # manual_dir -> (layout, fingerprint), found once
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    names = (annotations.EXPRESSION_NAMES_8 if self.builder_config.num_expr_classes == 8
             else annotations.EXPRESSION_NAMES_7)
    num_aus = len(annotations.AU_NAMES)
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(release.IMAGE_SIZE, release.IMAGE_SIZE, 3),
                                     encoding_format="jpeg"),
        "video": tfds.features.Text(),
        "frame": np.int32,
        # -1 where expression_mask is False; class names are in the metadata.
        "expression": np.int32,
        "expression_mask": np.bool_,
        "au": tfds.features.Tensor(shape=(num_aus,), dtype=np.int8),
        "au_mask": tfds.features.Tensor(shape=(num_aus,), dtype=np.bool_),
        "valence_arousal": tfds.features.Tensor(shape=(2,), dtype=np.float32),
        "va_mask": np.bool_,
    })
    metadata = tfds.core.MetadataDict(expression_names=list(names),
                                      au_names=list(annotations.AU_NAMES))
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, features=features, metadata=metadata,
        homepage="https://ibug.doc.ic.ac.uk/resources/aff-wild2/")

  def release_layout(self, manual_dir) -> layout_lib.ReleaseLayout:
    found = layout_lib.find_release_layout(manual_dir)
    if self._layout_overrides:
      found = layout_lib.layout_with_overrides(found, self._layout_overrides)
    return found

  def release_fingerprint(self, manual_dir) -> str:
    """The fingerprint of the release in manual_dir (computed once per builder)."""
    return self._found_release(manual_dir)[1]

  def stored_fingerprint(self) -> str | None:
    """The fingerprint stored with the dataset already built in data_dir, if any."""
    return self.info.metadata.get(fingerprint_lib.METADATA_KEY)

  def _found_release(self, manual_dir) -> tuple[layout_lib.ReleaseLayout, str]:
    key = str(manual_dir)
    if key not in self._release:
      found = self.release_layout(manual_dir)
      self._release[key] = found, fingerprint_lib.source_fingerprint(
          found, self.builder_config.source)
    return self._release[key]

  def _split_overlaps(self, found) -> list[dict]:
    if self.builder_config.source == "mtl":
      overlaps = release.check_mtl_split_overlap(found)
    else:
      overlaps = release.check_split_overlap(found)
    if overlaps:
      log.warning("%d videos are in both the train and the validation split (a "
                  "validation score includes frames of videos trained on): %s",
                  len(overlaps), "; ".join(o.describe() for o in overlaps))
    return [dataclasses.asdict(o) for o in overlaps]

  def _split_generators(self, dl_manager):
    found, fingerprint = self._found_release(dl_manager.manual_dir)
    log.info("release layout: %s", found.describe())
    if self.builder_config.source == "mtl":
      splits = sorted(found.mtl_files)
    else:
      splits = sorted({s for dirs in found.task_split_dirs.values() for s in dirs})
    if found.test_lists:
      splits.append("test")
    if not [s for s in splits if s != "test"]:
      raise MissingReleasePartError(
          f"no {self.builder_config.source} annotations found in {found.root}:\n"
          f"{MANUAL_DOWNLOAD_INSTRUCTIONS}")
    index = release.ImageIndex(found.image_roots)
    # A rebuild starts from the metadata of the dataset it replaces: set every key anew.
    self.info.metadata[fingerprint_lib.METADATA_KEY] = fingerprint
    self.info.metadata["videos_in_train_and_validation"] = self._split_overlaps(found)
    self.info.metadata["annotated_au_names"] = []
    self.info.metadata["summary"] = {}
    return {split: self._generate_examples(found, split, index) for split in splits}

  def _split_examples(self, found, split, summary, index):
    if split == "test":
      return release.iter_test_examples(found, summary, index)
    if self.builder_config.source == "mtl":
      return release.iter_mtl_examples(found, split, summary, index)
    return release.iter_per_task_examples(found, split, summary, index)

  def _generate_examples(self, found, split, index):
    summary = release.SplitSummary(num_expr_classes=self.builder_config.num_expr_classes)
    for example in self._split_examples(found, split, summary, index):
      features = release.label_arrays(example.labels)
      features.update(
          image=release.read_checked_jpeg(example,
                                          fix_mismatched=self._fix_mismatched_images),
          video=example.video, frame=np.int32(example.frame))
      yield f"{example.video}/{example.frame:05d}", features
    # The counts are complete only once the split is exhausted; TFDS writes the
    # metadata after all splits are generated, so they land in the dataset's info.
    self.info.metadata["summary"][split] = summary.as_dict()
    self.info.metadata["annotated_au_names"] = annotated_au_names(
        self.info.metadata["summary"].values())
    log.info("%s: %s", split, summary.as_dict())


def annotated_au_names(summaries) -> list[str]:
  """The AUs with a 0/1 label in any of the splits' summaries, in label-vector order."""
  labelled = [any(counts) for counts in zip(*(s["au_labelled_counts"] for s in summaries))]
  return [name for name, any_label in zip(annotations.AU_NAMES, labelled) if any_label]
