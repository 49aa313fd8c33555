"""Videos made from a real photograph that a package ships (scikit-image's astronaut),
for the tests, the benchmark and the documentation: one or several faces moving over a
background, a face that leaves the picture and comes back.

  python -m affect_jax.video.sample_videos OUT.mp4 [--faces 2] [--seconds 10]

scikit-image (the `test` extra) is imported only here.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Iterator, Sequence

import cv2
import numpy as np

WIDTH, HEIGHT = 640, 360
FACE_CUT = (slice(40, 240), slice(130, 330))  # her head: a face of ~86 px, centred


@dataclasses.dataclass(frozen=True)
class Actor:
  """One face: where it starts, how it moves (pixels a frame), when it is absent."""
  start: tuple[int, int]  # left, top of its patch (200 px times `scale`)
  velocity: tuple[float, float] = (0.0, 0.0)
  region: tuple[int, int, int, int] | None = None  # left, top, right, bottom it
  # bounces in (default: the frame)
  scale: float = 1.0
  mirrored: bool = False
  absent: tuple[int, int] = (0, 0)  # frames [first, last) without this face


def astronaut_face() -> np.ndarray:
  from skimage import data  # pylint: disable=g-import-not-at-top
  return np.ascontiguousarray(data.astronaut()[FACE_CUT])


def background(width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
  """A photograph without faces (scikit-image's rocket), dimmed, as the backdrop."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  return (cv2.resize(data.rocket(), (width, height), interpolation=cv2.INTER_AREA)
          * 0.6).astype(np.uint8)


def bounce(position: float, low: float, high: float) -> float:
  """`position` folded into [low, high] as a ball bounces between two walls."""
  span = high - low
  if span <= 0:
    return low
  folded = (position - low) % (2 * span)
  return low + (folded if folded <= span else 2 * span - folded)


def patch_corner(actor: Actor, frame: int, size: int, width: int, height: int
                 ) -> tuple[int, int]:
  left, top, right, bottom = actor.region or (0, 0, width, height)
  x = actor.start[0] + actor.velocity[0] * frame
  y = actor.start[1] + actor.velocity[1] * frame
  return (int(round(bounce(x, left, min(right, width) - size))),
          int(round(bounce(y, top, min(bottom, height) - size))))


def sample_frames(actors: Sequence[Actor], num_frames: int, width: int = WIDTH,
                  height: int = HEIGHT) -> Iterator[np.ndarray]:
  """RGB uint8 frames with each actor's face pasted where it is at that frame."""
  face, backdrop = astronaut_face(), background(width, height)
  patches = []
  for actor in actors:
    size = int(round(face.shape[0] * actor.scale))
    patch = cv2.resize(face, (size, size), interpolation=cv2.INTER_AREA)
    patches.append(patch[:, ::-1] if actor.mirrored else patch)
  for frame in range(num_frames):
    image = backdrop.copy()
    for actor, patch in zip(actors, patches):
      if actor.absent[0] <= frame < actor.absent[1]:
        continue
      size = patch.shape[0]
      left, top = patch_corner(actor, frame, size, width, height)
      image[top:top + size, left:left + size] = patch
    yield image


def actors_for(num_faces: int, width: int = WIDTH, height: int = HEIGHT) -> list[Actor]:
  """`num_faces` faces (1 to 4; every other one mirrored), each moving slowly in a cell
  of its own: one in the whole frame, two side by side, three or four in a 2x2 grid
  whose rows overlap below the faces (a patch's face is in its upper two thirds)."""
  if not 1 <= num_faces <= 4:
    raise ValueError(f"1 to 4 faces, not {num_faces}")
  if num_faces == 1:
    return [Actor(start=(220, 80), velocity=(2.0, 1.0))]
  columns = 2
  rows = 1 if num_faces == 2 else 2
  cell_width, row_top = width // columns, (0, height - 200)
  actors = []
  for i in range(num_faces):
    column, row = i % columns, i // columns
    region = (column * cell_width, row_top[row] if rows == 2 else 0,
              (column + 1) * cell_width, row_top[row] + 200 if rows == 2 else height)
    actors.append(Actor(start=(region[0] + 40, region[1] + 20),
                        velocity=(1.0 if i % 2 == 0 else -1.0, 0.5), region=region,
                        mirrored=i % 2 == 1))
  return actors


def write_video(path: str, frames: Iterator[np.ndarray], fps: float = 30.0) -> str:
  """An MP4 (OpenCV's mp4v codec) of RGB frames."""
  writer = None
  try:
    for image in frames:
      if writer is None:
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                 (image.shape[1], image.shape[0]))
        if not writer.isOpened():
          raise OSError(f"{path}: OpenCV cannot write an mp4v video here")
      writer.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
  finally:
    if writer is not None:
      writer.release()
  return path


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("out")
  parser.add_argument("--faces", type=int, default=1)
  parser.add_argument("--seconds", type=float, default=10.0)
  parser.add_argument("--fps", type=float, default=30.0)
  args = parser.parse_args(argv)
  write_video(args.out, sample_frames(actors_for(args.faces),
                                      int(round(args.seconds * args.fps))), args.fps)
  print(args.out)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
