"""Does building stream? Peak host memory (max RSS) and frames/s of generating and
building synthetic releases of growing size, each in a fresh process.

  python benchmarks/build_memory.py --frames 2000,20000 --out /tmp/build_memory

Peak memory that stays flat while the release grows tenfold means the build streams
(the TFDS write buffer is set small here so that both sizes spill to disk; the build
command's default of 256 MB bounds a real release the same way).
Prints one JSON line per size.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

CHILD = """
import json, resource, sys, time
from tfds_affwild2 import build
start = time.perf_counter()
builder = build.build_dataset(sys.argv[1], sys.argv[2], "union",
                              memory_buffer_mb=int(sys.argv[3]))
frames = sum(s.num_examples for s in builder.info.splits.values())
print(json.dumps({"frames": frames, "seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--frames", default="2000,20000")
  parser.add_argument("--frames_per_video", type=int, default=250)
  parser.add_argument("--out", default="/tmp/build_memory")
  parser.add_argument("--memory_buffer_mb", type=int, default=16,
                      help="small, so that both sizes spill to disk")
  args = parser.parse_args()
  for total in map(int, args.frames.split(",")):
    release = os.path.join(args.out, f"release_{total}")
    data_dir = os.path.join(args.out, f"tfds_{total}")
    shutil.rmtree(data_dir, ignore_errors=True)
    if not os.path.exists(os.path.join(release, "ground_truth.json")):
      subprocess.run([sys.executable, "-m", "tfds_affwild2.synthetic", "--out", release,
                      "--num_videos", str(max(3, total // args.frames_per_video)),
                      "--frames_per_video", str(args.frames_per_video)], check=True,
                     stdout=subprocess.DEVNULL)
    result = subprocess.run([sys.executable, "-c", CHILD, release, data_dir,
                             str(args.memory_buffer_mb)], check=True,
                            capture_output=True, text=True)
    row = json.loads(result.stdout.strip().splitlines()[-1])
    row.update(date=time.strftime("%Y-%m-%d"), memory_buffer_mb=args.memory_buffer_mb,
               frames_per_s=round(row["frames"] / row["seconds"]),
               seconds=round(row["seconds"], 1), peak_rss_mb=round(row["peak_rss_mb"]))
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
