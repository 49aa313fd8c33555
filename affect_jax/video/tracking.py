"""Every face of a stream of frames, each with an id that stays with it: the detector
runs every `detect_every` frames, each face is followed between detections, and a
detection is matched to the tracks by overlap.

Following a face costs little more than aligning it: with the 5-point landmark model
(face_recognition_models), its landmarks are found in its previous box and the box is
moved and scaled with them (the landmarks are the ones the face is aligned by); a small
grey picture of the aligned face is compared with the previous frame's (normalised
correlation), and a face whose picture no longer resembles it is lost. Without the
landmark model, dlib's correlation tracker follows the box (about 5 ms a face a frame
on a CPU core, 5 times the landmarks' cost) and its peak-to-side-lobe ratio says when
the face is lost.

- A detection that overlaps no track starts one. Its id is that of a face seen before
  and no longer tracked when dlib's face descriptor (a 128-d embedding whose model
  ships in face_recognition_models) lies within REIDENTIFY_DISTANCE of that face's,
  else a new id: a face that leaves the picture and comes back keeps its id.
- A track whose face the detector no longer finds ends.
- A track lost between detections (the face left, was covered or turned away) ends
  at once and the detector runs on that frame: re-detection does not wait for the next
  detection frame.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

import affect_jax.video.face_crops as face_crops

DETECT_EVERY = 10
MIN_IOU = 0.3
# dlib's correlation tracker reports the peak-to-side-lobe ratio of its response: a
# face it follows scores about 10 to 30; below 7 the response no longer has a clear peak.
MIN_TRACKING_QUALITY = 7.0
# The aligned face from one frame to the next correlates above 0.9 (it moves, it
# speaks); a box left on the background or on another face falls far below.
MIN_APPEARANCE_CORRELATION = 0.6
MAX_SCALE_CHANGE = 1.3  # between two frames, of the landmarks' spread
SIGNATURE_SIZE = 24  # pixels a side of the grey picture compared between frames
# dlib's documented threshold: descriptors of the same person lie within 0.6.
REIDENTIFY_DISTANCE = 0.6
DESCRIPTOR_MODEL_FILE = ("models", "dlib_face_recognition_resnet_model_v1.dat")
CHIP_SIZE = 150  # the descriptor network's input


@dataclasses.dataclass
class TrackedFace:
  """One face in one frame: its id, its box (from the detector on detection frames,
  from the tracker between them) and the score of its latest detection."""
  face_id: int
  box: face_crops.FaceBox
  detected: bool
  landmarks: np.ndarray | None = None  # [5, 2] pixels, when aligned by landmarks
  aligned: np.ndarray | None = None  # the face aligned on them, 112 x 112 RGB


@dataclasses.dataclass
class Track:
  face_id: int
  box: face_crops.FaceBox
  tracker: object = None  # dlib.correlation_tracker, without landmarks
  landmarks: np.ndarray | None = None
  aligned: np.ndarray | None = None
  box_in_landmarks: np.ndarray | None = None  # centre offset, side: in spreads
  signature: np.ndarray | None = None
  chip: np.ndarray | None = None  # its face at the latest detection, for re-id
  descriptor: np.ndarray | None = None

  def face(self, detected: bool) -> TrackedFace:
    return TrackedFace(self.face_id, self.box, detected, self.landmarks, self.aligned)


def iou(a: face_crops.FaceBox, b: face_crops.FaceBox) -> float:
  """Intersection over union of two boxes."""
  width = min(a.right, b.right) - max(a.left, b.left)
  height = min(a.bottom, b.bottom) - max(a.top, b.top)
  if width <= 0 or height <= 0:
    return 0.0
  inter = width * height
  return inter / float(a.area + b.area - inter)


def match_boxes(tracked: Sequence[face_crops.FaceBox],
                detected: Sequence[face_crops.FaceBox], min_iou: float = MIN_IOU) -> list[tuple[int, int]]:
  """Pairs (track index, detection index), greedily by decreasing overlap, each at
  most once, overlapping by at least `min_iou`."""
  pairs = sorted(((iou(t, d), i, j) for i, t in enumerate(tracked)
                  for j, d in enumerate(detected)), reverse=True)
  used_tracks, used_detections, matches = set(), set(), []
  for overlap, i, j in pairs:
    if overlap < min_iou:
      break
    if i not in used_tracks and j not in used_detections:
      matches.append((i, j))
      used_tracks.add(i)
      used_detections.add(j)
  return sorted(matches)


def descriptor_model_path() -> str | None:
  """dlib's face descriptor network in the installed face_recognition_models, or None."""
  model = face_crops.landmark_model_path()
  if model is None:
    return None
  path = os.path.join(os.path.dirname(os.path.dirname(model)), *DESCRIPTOR_MODEL_FILE)
  return path if os.path.isfile(path) else None


class Reidentifier:
  """Descriptors of face chips and the nearest face seen before."""

  def __init__(self, model_path: str):
    import dlib  # pylint: disable=g-import-not-at-top
    self._network = dlib.face_recognition_model_v1(model_path)

  def descriptor(self, chip: np.ndarray) -> np.ndarray:
    return np.asarray(self._network.compute_face_descriptor(chip), np.float32)


def create_reidentifier(enabled: bool = True) -> Reidentifier | None:
  path = descriptor_model_path() if enabled else None
  return Reidentifier(path) if path else None


class FaceTracker:
  """Faces of consecutive frames of one stream, with ids (see the module's doc)."""

  def __init__(self, detector, landmarks_predictor=None, *,
               detect_every: int = DETECT_EVERY, min_score: float = face_crops.MIN_SCORE,
               upsample: Sequence[int] = (0,), reidentifier: Reidentifier | None = None,
               min_tracking_quality: float = MIN_TRACKING_QUALITY):
    if detect_every < 1:
      raise ValueError(f"detect_every must be 1 or more, not {detect_every}")
    self.detector = detector
    self.landmarks_predictor = landmarks_predictor
    self.detect_every = detect_every
    self.min_score = min_score
    self.upsample = tuple(upsample)
    self.reidentifier = reidentifier
    self.min_tracking_quality = min_tracking_quality
    self.tracks: list[Track] = []
    self.ended: list[Track] = []  # faces no longer tracked, for re-identification
    self.next_id = 1
    self.frames_seen = 0
    self.detections_run = 0

  def detect(self, image: np.ndarray) -> list[face_crops.FaceBox]:
    self.detections_run += 1
    for upsample in self.upsample:
      boxes = [b for b in face_crops.detect_faces(self.detector, image, upsample)
               if b.score >= self.min_score]
      if boxes:
        return boxes
    return []

  def update(self, image: np.ndarray) -> list[TrackedFace]:
    """The faces of the next frame, in the order of their ids."""
    due = self.frames_seen % self.detect_every == 0
    self.frames_seen += 1
    followed = [t for t in self.tracks if self.follow(t, image)]
    lost = len(followed) < len(self.tracks)
    for track in self.tracks:
      if track not in followed:
        self.end(track)
    self.tracks = followed
    if not (due or lost):
      return [t.face(False) for t in self.tracks]
    detected = self.detect(image)
    matches = dict(match_boxes([t.box for t in self.tracks], detected))
    kept = []
    for i, track in enumerate(self.tracks):
      if i in matches:
        self.restart(track, image, detected[matches[i]])
        kept.append(track)
      else:
        self.end(track)
    matched = set(matches.values())
    for j, box in enumerate(detected):
      if j not in matched:
        kept.append(self.start_track(image, box))
    self.tracks = sorted(kept, key=lambda t: t.face_id)
    for track in self.tracks:
      if self.reidentifier is not None:
        track.chip = self.chip(image, track.box)
    return [t.face(True) for t in self.tracks]

  def follow(self, track: Track, image: np.ndarray) -> bool:
    """Moves the track's box to where its face is in `image`; False when lost."""
    if track.tracker is not None:
      quality = track.tracker.update(image)
      track.box = box_of(track.tracker.get_position(), track.box.score)
      return quality >= self.min_tracking_quality
    landmarks = face_crops.detect_landmarks(self.landmarks_predictor, image, track.box)
    spread, previous = landmark_spread(landmarks), landmark_spread(track.landmarks)
    if not (previous / MAX_SCALE_CHANGE <= spread <= previous * MAX_SCALE_CHANGE):
      return False
    aligned = face_crops.warp_to_square(image, face_crops.alignment_matrix(landmarks))
    signature = appearance(aligned)
    if correlation(signature, track.signature) < MIN_APPEARANCE_CORRELATION:
      return False
    track.landmarks, track.aligned, track.signature = landmarks, aligned, signature
    track.box = box_from_landmarks(landmarks, track.box_in_landmarks, track.box.score,
                                   image.shape)
    return True

  def restart(self, track: Track, image: np.ndarray, box: face_crops.FaceBox) -> None:
    """The track at a detection: its box, its landmarks and picture found afresh."""
    track.box = box
    if self.landmarks_predictor is None:
      if track.tracker is None:
        import dlib  # pylint: disable=g-import-not-at-top
        track.tracker = dlib.correlation_tracker()
      start_tracker(track, image)
      return
    track.landmarks = face_crops.detect_landmarks(self.landmarks_predictor, image, box)
    track.box_in_landmarks = landmarks_frame_of(box, track.landmarks)
    track.aligned = face_crops.warp_to_square(
        image, face_crops.alignment_matrix(track.landmarks))
    track.signature = appearance(track.aligned)

  def chip(self, image: np.ndarray, box: face_crops.FaceBox) -> np.ndarray | None:
    """The face as the descriptor network takes it (150 px, aligned by dlib)."""
    if self.landmarks_predictor is None:
      return None
    import dlib  # pylint: disable=g-import-not-at-top
    shape = self.landmarks_predictor(image, dlib.rectangle(
        box.left, box.top, box.right - 1, box.bottom - 1))
    return np.asarray(dlib.get_face_chip(image, shape, size=CHIP_SIZE))

  def end(self, track: Track) -> None:
    track.tracker = track.signature = track.aligned = None
    if self.reidentifier is not None and track.chip is not None:
      self.ended.append(track)

  def start_track(self, image: np.ndarray, box: face_crops.FaceBox) -> Track:
    track = Track(self.reidentified(image, box), box)
    self.restart(track, image, box)
    return track

  def reidentified(self, image: np.ndarray, box: face_crops.FaceBox) -> int:
    """The id of the nearest face no longer tracked, when it is the same person; else
    a new id. Descriptors are computed only here: when a face appears while others
    have gone (a fifth of a second each on a CPU)."""
    if self.reidentifier is not None and self.ended:
      chip = self.chip(image, box)
      if chip is not None:
        descriptor = self.reidentifier.descriptor(chip)
        for track in self.ended:
          if track.descriptor is None:
            track.descriptor = self.reidentifier.descriptor(track.chip)
        distances = [float(np.linalg.norm(t.descriptor - descriptor))
                     for t in self.ended]
        nearest = int(np.argmin(distances))
        if distances[nearest] <= REIDENTIFY_DISTANCE:
          return self.ended.pop(nearest).face_id
    face_id, self.next_id = self.next_id, self.next_id + 1
    return face_id


def start_tracker(track: Track, image: np.ndarray) -> None:
  import dlib  # pylint: disable=g-import-not-at-top
  box = track.box
  track.tracker.start_track(image, dlib.rectangle(box.left, box.top, box.right - 1,
                                                  box.bottom - 1))


def box_of(rectangle, score: float) -> face_crops.FaceBox:
  """A tracker's (float) rectangle as a FaceBox in whole pixels, right/bottom exclusive."""
  return face_crops.FaceBox(int(round(rectangle.left())), int(round(rectangle.top())),
                       int(round(rectangle.right())) + 1,
                       int(round(rectangle.bottom())) + 1, score)


def landmark_spread(landmarks: np.ndarray) -> float:
  """The landmarks' root-mean-square distance from their centre: their scale."""
  return float(np.sqrt(((landmarks - landmarks.mean(0)) ** 2).sum(1).mean()))


def landmarks_frame_of(box: face_crops.FaceBox, landmarks: np.ndarray) -> np.ndarray:
  """Where the box lies relative to its landmarks: (centre offset x, y, side), in
  units of their spread; a detection's box, kept as the landmarks move."""
  centre, spread = landmarks.mean(0), landmark_spread(landmarks)
  box_centre = np.array([(box.left + box.right) / 2, (box.top + box.bottom) / 2])
  side = max(box.right - box.left, box.bottom - box.top)
  return np.array([*(box_centre - centre) / spread, side / spread])


def box_from_landmarks(landmarks: np.ndarray, frame: np.ndarray, score: float,
                       shape: tuple) -> face_crops.FaceBox:
  """The box that stands to these landmarks as the detection stood to its own,
  clipped to the image."""
  spread = landmark_spread(landmarks)
  centre = landmarks.mean(0) + frame[:2] * spread
  half = frame[2] * spread / 2
  height, width = shape[:2]
  left, top = max(0, int(round(centre[0] - half))), max(0, int(round(centre[1] - half)))
  right = min(width, int(round(centre[0] + half)))
  bottom = min(height, int(round(centre[1] + half)))
  return face_crops.FaceBox(left, top, max(right, left + 1), max(bottom, top + 1), score)


def appearance(aligned: np.ndarray) -> np.ndarray:
  """A small grey picture of the aligned face, zero mean and unit norm."""
  import cv2  # pylint: disable=g-import-not-at-top
  picture = cv2.resize(aligned, (SIGNATURE_SIZE, SIGNATURE_SIZE),
                       interpolation=cv2.INTER_AREA).astype(np.float32).mean(-1)
  picture -= picture.mean()
  return picture / max(float(np.linalg.norm(picture)), 1e-6)


def correlation(a: np.ndarray, b: np.ndarray | None) -> float:
  return 1.0 if b is None else float((a * b).sum())
