"""Records of the TFDS `affwild2` dataset, read straight from its ArrayRecord files.

`RawExampleSource` parses each stored tf.train.Example with protobuf following the
dataset's feature spec (TFDS's per-record feature decoding was most of the cost of a
record); opening a split checks its first and last records field by field against
TFDS's own decoding and falls back to TFDS's reader for specs it does not know. Also:
JPEG decoding and one record -> one example of labels and masks."""
from __future__ import annotations

import logging
import math

import cv2
import numpy as np

from affect_jax import errors

log = logging.getLogger(__name__)


def decode_jpeg(data: bytes) -> np.ndarray:
  """JPEG (or PNG) bytes -> uint8 RGB [H, W, 3]; OpenCV decodes 112x112 JPEG ~1.7x
  faster than PIL here. Undecodable bytes are a ValueError."""
  try:
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
  except cv2.error:  # empty bytes
    pixels = None
  if pixels is None:
    raise ValueError(f"not a decodable image ({len(data)} bytes)")
  return pixels


def _describe_record(record, index: int) -> str:
  described = f"record {index}"
  video, frame = record.get("video"), record.get("frame")
  if video is not None:
    video = video.decode(errors="replace") if isinstance(video, bytes) else str(video)
    described += f" (video {video!r}, frame {frame})"
  return described


def decode_record_image(record, index: int) -> np.ndarray:
  """The record's image as uint8 RGB; an undecodable one is an InputError naming the
  record (index, video, frame)."""
  try:
    return decode_jpeg(record["image"])
  except ValueError as e:
    raise errors.InputError(f"{_describe_record(record, index)}: {e}") from None


def record_to_example(record: dict, index: int) -> dict:
  """Labels in the training convention: float masks, 0 fillers under masks."""
  return {
      "expression": np.int32(max(int(record["expression"]), 0)),
      "expression_mask": np.float32(record["expression_mask"]),
      "au": np.asarray(record["au"], np.float32),
      "au_mask": np.asarray(record["au_mask"], np.float32),
      "valence_arousal": np.asarray(record["valence_arousal"], np.float32),
      "va_mask": np.float32(record["va_mask"]),
      "record_index": np.int32(index),
  }


class UnsupportedFeatureSpec(ValueError):
  """A dataset `RawExampleSource` cannot read: not ArrayRecord files of tf.train.Example,
  or features that are not flat fixed-shape tensors."""


def _example_class():
  # TFDS's own compiled tf.train.Example (tensorflow_datasets/proto, in the wheel since
  # 4.9.x; protobuf is a dependency of tensorflow-datasets): no TensorFlow needed.
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
  return tf_example_pb2.Example


def raw_fields(serialized_info) -> tuple:
  """(name, proto list kind, converter) of each feature, from the builder's serialized
  feature spec: scalars -> Python int / bool / float / bytes, tensors -> NumPy arrays
  of the spec's dtype and shape, as TFDS's `ExampleParserNp` makes them.
  UnsupportedFeatureSpec for anything but flat, fixed-shape int/bool/float/bytes."""
  fields = []
  for name, info in serialized_info.items():
    shape = getattr(info, "shape", None)
    dtype = getattr(info, "np_dtype", None)
    if not isinstance(shape, tuple) or dtype is None:
      raise UnsupportedFeatureSpec(f"feature {name!r} is not a single tensor: {info!r}")
    if any(d is None or d < 0 for d in shape) or getattr(info, "sequence_rank", 0):
      raise UnsupportedFeatureSpec(f"feature {name!r} has a variable shape {shape}")
    dtype = np.dtype(dtype)
    kind = {"b": "int64_list", "i": "int64_list", "u": "int64_list", "f": "float_list",
            "O": "bytes_list", "S": "bytes_list"}.get(dtype.kind)
    if kind is None:
      raise UnsupportedFeatureSpec(f"feature {name!r} has dtype {dtype}")
    fields.append((name, kind, FieldConverter(dtype, shape)))
  return tuple(fields)


class FieldConverter:
  """values (a protobuf repeated field) -> the feature's value; ValueError when the
  number of values does not fit the shape. (A class, not a closure: picklable into
  grain's worker processes.)"""

  def __init__(self, dtype: np.dtype, shape: tuple):
    self.dtype, self.shape, self.size = dtype, shape, math.prod(shape)
    if shape:
      self.form = "vector" if len(shape) == 1 and dtype.kind != "O" else "array"
    elif dtype.kind in "OS":
      self.form = "bytes"
    elif dtype.kind == "b":
      self.form = "bool"
    elif dtype.kind == "f" and dtype.itemsize <= 4:  # a float_list holds float32
      self.form = "float"
    else:
      self.form = "scalar"

  def __call__(self, values):
    if len(values) != self.size:
      raise ValueError(f"{len(values)} values, expected {self.size} (shape {self.shape}, "
                       f"dtype {self.dtype})")
    form = self.form
    if form == "vector":
      return np.fromiter(values, self.dtype, self.size)
    if form == "bytes":
      return values[0]
    if form == "bool":
      return bool(values[0])
    if form == "float":
      return float(values[0])
    if form == "array":
      return np.array(values, self.dtype).reshape(self.shape)
    return self.dtype.type(values[0]).item()


class RawExampleSource:
  """A TFDS ArrayRecord split read without TFDS's per-record feature decoding.

  Each record's serialized tf.train.Example is parsed by protobuf (upb) and its fields
  picked by the builder's serialized feature spec: scalars as Python int / bool / float
  / bytes, tensors as NumPy arrays of the spec's dtype and shape -- what TFDS's source
  returns with the image left as bytes, at ~45 instead of ~165 us a record (TFDS's
  `deserialize_example_np` is ~130 of them). `check_against_tfds` compares both
  readings of a few records, field by field, and raises on any difference.
  """

  def __init__(self, tfds_source):
    file_format = getattr(tfds_source.dataset_info.file_format, "value",
                          tfds_source.dataset_info.file_format)
    if file_format != "array_record":
      raise UnsupportedFeatureSpec(f"records stored as {file_format!r}, not "
                                   "serialized tf.train.Example in ArrayRecord")
    self.tfds_source = tfds_source
    self._records = tfds_source.data_source  # array_record's ArrayRecordDataSource
    self._fields = raw_fields(tfds_source.dataset_info.features.get_serialized_info())
    self._parse = _example_class().FromString

  def __getstate__(self):
    state = self.__dict__.copy()
    del state["_parse"]  # a protobuf class's method: rebuilt where unpickled
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._parse = _example_class().FromString

  @property
  def dataset_info(self):
    return self.tfds_source.dataset_info

  def __len__(self) -> int:
    return len(self._records)

  def __repr__(self) -> str:
    return f"RawExampleSource({self.tfds_source!r})"

  def _decode(self, data: bytes, index: int) -> dict:
    feature = self._parse(data).features.feature
    record = {}
    for name, kind, convert in self._fields:
      try:
        record[name] = convert(getattr(feature[name], kind).value)
      except ValueError as e:
        raise ValueError(f"record {index}: feature {name!r} in its {kind}: {e}") from None
    return record

  def __getitem__(self, index):
    index = index.__index__()
    return self._decode(self._records[index], index)

  def __getitems__(self, indices):
    return [self[i] for i in indices]

  def __iter__(self):
    for index in range(len(self)):
      yield self[index]

  def check_against_tfds(self, indices=None) -> None:
    """ValueError naming the first field where the raw parse of a record differs from
    TFDS's decoding of it (value, dtype, shape or Python type). Defaults: the first
    and the last record."""
    if indices is None:
      indices = sorted({0, len(self) - 1}) if len(self) else []
    for index in indices:
      raw, tfds_record = self[index], self.tfds_source[index]
      if set(raw) != set(tfds_record):
        raise ValueError(f"record {index}: the raw parse has the fields {sorted(raw)}, "
                         f"TFDS's decoding {sorted(tfds_record)}")
      for name, value in tfds_record.items():
        if not _same_value(raw[name], value):
          raise ValueError(
              f"record {index}, feature {name!r}: the raw tf.train.Example parse gives "
              f"{raw[name]!r}, TFDS's decoding {value!r}; this dataset's features are "
              "not read correctly by RawExampleSource: open it with "
              "open_data_source(..., raw=False)")


def _same_value(a, b) -> bool:
  if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
    return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
            and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b))
  return type(a) is type(b) and a == b


BUILD_HINT = "build it with affect-jax build --manual_dir RELEASE --data_dir DATA_DIR"


def built_dataset_builder(name: str, data_dir: str | None):
  """The TFDS builder of dataset `name` (config.dataset.name) built in `data_dir`
  (config.dataset.data_dir; None: TFDS's default); an InputError saying so when the
  name is unknown or the dataset is not built there."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top  # gs:// paths too
  folder = name.split(":")[0]  # a name may pin its version: affwild2/union:1.0.0
  if data_dir is not None and not (epath.Path(data_dir) / folder).exists():
    # Checked first: TFDS would log a warning about the missing folder before failing.
    raise errors.InputError(f"dataset {name} is not built in {data_dir} "
                            f"(config.dataset.data_dir): {BUILD_HINT}")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except ValueError as e:  # an unknown dataset or config; TFDS lists every dataset
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise errors.InputError(f"config.dataset.name {name!r}: {reason}") from None
  if not builder.is_prepared():
    raise errors.InputError(f"dataset {name} is not built in {builder.data_dir_root} "
                            f"(config.dataset.data_dir): {BUILD_HINT}")
  return builder


def check_split(builder, split: str) -> None:
  """An InputError naming the dataset's splits when `split` (TFDS's `train`,
  `validation[:10%]`, `train+validation`) names one it does not have."""
  names = [part.split("[")[0].strip() for part in split.split("+")]
  unknown = [n for n in names if n not in builder.info.splits]
  if unknown:
    raise errors.InputError(f"dataset {builder.info.full_name} has no split "
                            f"{', '.join(map(repr, unknown))}; its splits: "
                            f"{', '.join(builder.info.splits)}")


def open_data_source(name: str, split: str, data_dir: str | None, raw: bool = True):
  """A split of the TFDS ArrayRecord dataset, images left as JPEG bytes; an InputError
  when the dataset is not built or has no such split.

  raw (default): a `RawExampleSource` (the same records, ~3.5x cheaper to read),
  checked against TFDS's decoding on the split's first and last record (ValueError on
  any difference); for a feature spec it cannot read (not flat fixed-shape tensors),
  TFDS's own source, with a warning. raw=False: TFDS's source.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = built_dataset_builder(name, data_dir)
  check_split(builder, split)
  tfds_source = builder.as_data_source(split,
                                       decoders={"image": tfds.decode.SkipDecoding()})
  if not raw:
    return tfds_source
  try:
    source = RawExampleSource(tfds_source)
  except UnsupportedFeatureSpec as e:
    log.warning("%s %s: reading through TFDS's feature decoding (slower): %s", name,
                split, e)
    return tfds_source
  source.check_against_tfds()
  return source


