"""Faces in a video, end to end (a fresh process: start-up, restore and compilation
included), before and after the video analysis, in the same run on the same videos.

  python benchmarks/video_faces.py --out benchmarks/results/video_faces.jsonl \\
      [--seconds 30] [--faces_seconds 10] [--before_revision 2e6ded6]

- "before": the faces command of `--before_revision` (its affect_jax/inference/faces.py,
  run as a script over today's package: it keeps the largest face, runs the detector
  on every frame and round-trips each crop through a JPEG file);
- "after": today's `python -m affect_jax.inference.faces` (tracking, batches in memory),
  with a cold compilation cache (its own empty folder) in the first round, then warm;
  before and after alternate over `--rounds` rounds (the load of a shared machine
  drifts: compare medians of the same run);
- the same "after" on videos with 1, 2 and 4 faces (and "before" on the two-face one:
  one row a frame, the larger face);
- decoding alone, OpenCV against imageio-ffmpeg (the reader before).
The model is ResNet-18 (configs/default.py) at initialisation (benchmarks/video_run.py):
speed does not depend on the weights. Videos: benchmarks' sample videos, 640x360 at
30 fps, scikit-image's astronaut moving over a photograph (affect_jax.video.
sample_videos). One JSON line per measurement, with the load average around it (the
machine is shared: compare rows of the same run).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PYTHON = sys.executable


def run_timed(command: list[str], env: dict | None = None) -> tuple[float, str]:
  """Seconds a command takes as a fresh process; stops the benchmark when it fails."""
  start = time.perf_counter()
  done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if done.returncode != 0:
    raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
  return seconds, done.stdout


def csv_rows(path: str) -> list[dict]:
  with open(path) as f:
    return list(csv.DictReader(f))


def faces_per_frame(rows: list[dict], frame_key: str = "frame") -> dict:
  counts: dict = {}
  for row in rows:
    key = (row.get("source") or row.get("video"), row[frame_key])
    counts[key] = counts.get(key, 0) + 1
  histogram: dict = {}
  for count in counts.values():
    histogram[count] = histogram.get(count, 0) + 1
  return {"frames_with_face": len(counts), "faces_per_frame": histogram}


def old_faces_script(revision: str, folder: str) -> str:
  source = subprocess.run(["git", "show", f"{revision}:affect_jax/inference/faces.py"],
                          cwd=ROOT, capture_output=True, text=True, check=True).stdout
  path = os.path.join(folder, "faces_before.py")
  with open(path, "w") as f:
    f.write(source)
  return path


def decode_rate(path: str) -> dict:
  """Frames/s of decoding alone: OpenCV (today) and imageio-ffmpeg (before)."""
  import cv2  # pylint: disable=g-import-not-at-top
  import imageio.v3 as iio  # pylint: disable=g-import-not-at-top
  rates = {}
  start, count = time.perf_counter(), 0
  capture = cv2.VideoCapture(path)
  while True:
    ok, bgr = capture.read()
    if not ok:
      break
    cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    count += 1
  capture.release()
  rates["opencv"] = count / (time.perf_counter() - start)
  start, count = time.perf_counter(), 0
  for _ in iio.imiter(path):
    count += 1
  rates["imageio_ffmpeg"] = count / (time.perf_counter() - start)
  return {name: round(rate, 1) for name, rate in rates.items()}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                    "video_faces.jsonl"))
  parser.add_argument("--seconds", type=float, default=30.0)
  parser.add_argument("--faces_seconds", type=float, default=10.0)
  parser.add_argument("--before_revision", default="2e6ded6")
  parser.add_argument("--workdir", default=None, help="an existing run to restore")
  parser.add_argument("--skip_before", action="store_true")
  parser.add_argument("--rounds", type=int, default=2)
  args = parser.parse_args()
  from affect_jax.video import sample_videos  # pylint: disable=g-import-not-at-top
  folder = tempfile.mkdtemp(prefix="video_faces_")
  workdir = args.workdir or os.path.join(folder, "run")
  if args.workdir is None:
    run_timed([PYTHON, os.path.join(ROOT, "benchmarks", "video_run.py"), workdir])
  fps = 30.0
  one_face = sample_videos.write_video(
      os.path.join(folder, "one_face.mp4"), sample_videos.sample_frames(
          sample_videos.actors_for(1), int(args.seconds * fps)), fps)
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(folder, "jax_cache"))
  results = []

  def record(name: str, video: str, frames: int, seconds: float, out: str,
             load_before: tuple, **extra) -> None:
    rows = csv_rows(out)
    result = {"benchmark": "video_faces", "measure": name, "video": os.path.basename(
        video), "frames": frames, "seconds": round(seconds, 2),
              "frames_per_second": round(frames / seconds, 2), "rows": len(rows),
              **faces_per_frame(rows), "load_before": load_before,
              "load_after": os.getloadavg(), "cpus": os.cpu_count(),
              "machine": platform.processor() or platform.machine(), **extra}
    print(json.dumps(result), flush=True)
    results.append(result)

  frames = int(args.seconds * fps)
  script = old_faces_script(args.before_revision, folder)
  for round_number in range(1, args.rounds + 1):
    if not args.skip_before:
      out = os.path.join(folder, f"before_{round_number}")
      load = os.getloadavg()
      seconds, _ = run_timed([PYTHON, script, "--workdir", workdir, "--input",
                              one_face, "--out", out], env)
      record("before", one_face, frames, seconds, os.path.join(out, "predictions.csv"),
             load, revision=args.before_revision, round=round_number)
    cache = "cold" if round_number == 1 else "warm"
    out = os.path.join(folder, f"after_{round_number}")
    load = os.getloadavg()
    seconds, _ = run_timed([PYTHON, "-m", "affect_jax.inference.faces", "--workdir",
                            workdir, "--input", one_face, "--out", out], env)
    record(f"after_{cache}_cache", one_face, frames, seconds,
           os.path.join(out, "faces.csv"), load, round=round_number)
  for count in (1, 2, 4):
    frames = int(args.faces_seconds * fps)
    video = sample_videos.write_video(
        os.path.join(folder, f"faces_{count}.mp4"), sample_videos.sample_frames(
            sample_videos.actors_for(count), frames), fps)
    if count == 2 and not args.skip_before:  # what the faces command found before
      out = os.path.join(folder, "before_faces_2")
      load = os.getloadavg()
      seconds, _ = run_timed([PYTHON, script, "--workdir", workdir, "--input", video,
                              "--out", out], env)
      record("before_2_faces", video, frames, seconds,
             os.path.join(out, "predictions.csv"), load, faces_in_video=count,
             revision=args.before_revision)
    out = os.path.join(folder, f"faces_{count}")
    load = os.getloadavg()
    seconds, _ = run_timed([PYTHON, "-m", "affect_jax.inference.faces", "--workdir",
                            workdir, "--input", video, "--out", out], env)
    record(f"after_{count}_faces_warm_cache", video, frames, seconds,
           os.path.join(out, "faces.csv"), load, faces_in_video=count)
  decoding = {"benchmark": "video_faces", "measure": "decode_only",
              "video": os.path.basename(one_face), "frames_per_second": decode_rate(
                  one_face), "load": os.getloadavg()}
  print(json.dumps(decoding), flush=True)
  results.append(decoding)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "a") as f:
    for result in results:
      f.write(json.dumps(result) + "\n")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
