"""Writes a synthetic Aff-Wild2 release in the real ABAW on-disk layout.

    affect-jax synthetic --out DIR --seed 0 --generation abaw6 \\
        --mtl_format abaw4 --num_videos 12 --frames_per_video 60
    (or python -m tfds_affwild2.synthetic ...)

Each video is one procedural person (synthetic_faces) living through a sequence of
expression segments; the expression drives the action units by their FACS/EMFACS
prototypes, the drawn AUs decide the AU labels, and expression plus AUs decide valence
and arousal, so every label can be learned from the pixels. The release carries the
quirks of the real data: videos annotated for only some tasks, invalid lines (-1, -5,
-5.0), frames without a face image, annotation files longer than the video, two-person
videos split into _left/_right, (ABAW6) two image roots, and two test lists naming the
same test frames: a list of video names and an organisers' sample file listing every
frame 1..N of each test video, frames without a face image included (test videos start
and end without a face, so N is more than the last face frame). ground_truth.json
states what a correct reader must count; its schema is documented on
`generate_release`.
"""
import contextlib
import dataclasses
import json
import pathlib
import sys
import time
from typing import Sequence

import numpy as np
from absl import flags

from tfds_affwild2 import annotations, synthetic_faces, synthetic_labels

EXPR_NAMES = annotations.EXPRESSION_NAMES_8
TASKS = ("va", "expr", "au")
SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class Layout:
    task_roots: dict          # task -> folder at the release root
    split_dirs: dict          # "train"/"validation" -> folder inside each task root
    num_expr_classes: int
    image_roots: tuple


_ABAW3_ROOTS = {"va": "VA_Estimation_Challenge", "expr": "EXPR_Classification_Challenge",
                "au": "AU_Detection_Challenge"}
LAYOUTS = {
    "abaw1": Layout({"va": "VA_Set", "expr": "EXPR_Set", "au": "AU_Set"},
                    {"train": "Training_Set", "validation": "Validation_Set"}, 7,
                    ("cropped_aligned",)),
    "abaw2": Layout({"va": "VA_Set", "expr": "EXPR_Set", "au": "AU_Set"},
                    {"train": "Train_Set", "validation": "Validation_Set"}, 7,
                    ("cropped_aligned",)),
    "abaw3": Layout(_ABAW3_ROOTS, {"train": "Train_Set", "validation": "Validation_Set"}, 8,
                    ("cropped_aligned",)),
    "abaw6": Layout({**_ABAW3_ROOTS, "expr": "EXPR_Recognition_Challenge"},
                    {"train": "Train_Set", "validation": "Validation_Set"}, 8,
                    ("cropped_aligned", "cropped_aligned_new_50_vids")),
}
MTL_FILES = {"abaw3": {"train": "train_set.txt", "validation": "validation_set.txt"},
             "abaw4": {"train": "training_set_annotations.txt",
                       "validation": "validation_set_annotations.txt"}}
MTL_HEADER = "image,valence,arousal,expression,aus"
TEST_LIST = "test_set_release.txt"              # the test videos' names
# The organisers' sample submission: a header, then every frame of every test video
# (ABAW5 and later ship one per challenge, e.g. CVPR_6th_ABAW_Expr_test_set_sample.txt).
TEST_SAMPLE_LIST = "CVPR_6th_ABAW_EXPR_test_set_sample.txt"
# Frames without a face at the start and the end of every test video: a submission that
# stops at the last face frame, or starts at the first, misses listed frames.
TEST_FACELESS_ENDS = (1, 2)
GROUND_TRUTH = "ground_truth.json"
_PROGRESS_EVERY = 500


def task_header(task: str, num_expr_classes: int) -> str:
    if task == "va":
        return "valence,arousal"
    if task == "expr":
        return ",".join(EXPR_NAMES[:num_expr_classes])
    return ",".join(synthetic_faces.AU_NAMES)


def _runs(rng, num_frames, count, longest):
    mask = np.zeros(num_frames, bool)
    longest = max(1, min(longest, num_frames // 5))
    for _ in range(count):
        start = int(rng.integers(0, num_frames))
        mask[start:start + int(rng.integers(1, longest + 1))] = True
    return mask


@dataclasses.dataclass(frozen=True)
class Defects:
    present: np.ndarray       # (n,) bool: the frame has a face image
    valid: dict               # task -> (n,) bool; all False for tasks the video lacks
    va_style: np.ndarray      # (n,) how an invalid VA line is written: -5 / -5.0 / one value
    extra_lines: dict         # task -> lines after the last frame (no image)


def sample_defects(rng, num_frames, tasks):
    """Where the release is imperfect: runs of frames without a face (about 3%), runs of
    invalid lines in each task file (about 4%), and files longer than the video."""
    present = ~_runs(rng, num_frames, max(1, rng.poisson(num_frames * 0.008)), 6)
    valid = {task: np.zeros(num_frames, bool) for task in TASKS}
    extra = {}
    for task in tasks:
        valid[task] = ~_runs(rng, num_frames, max(1, rng.poisson(num_frames * 0.012)), 4)
        extra[task] = int(rng.integers(1, 4)) if rng.random() < 0.3 else 0
    va_style = rng.choice(3, size=num_frames, p=[0.45, 0.45, 0.1])
    return Defects(present, valid, va_style, extra)


@dataclasses.dataclass(frozen=True)
class VideoPlan:
    name: str
    split: str                # "train", "validation" or "test"
    num_frames: int
    tasks: tuple              # annotated tasks; empty for test videos
    image_root: str
    seed: np.random.SeedSequence


def _video_names(rng, num_units, num_pairs):
    """Aff-Wild2-like names; a pair is one two-person video, as `_left`/`_right` or as
    the irregular `name` + `name_right` / `name_left` the real release also has."""
    numbers = rng.choice(np.arange(1, 1000), size=num_units, replace=False)
    units = []
    for i, number in enumerate(numbers.tolist()):
        if rng.random() < 0.5:
            base = f"video{number}"
        else:
            width, height = [(640, 360), (640, 480), (1280, 720), (1920, 1080)][rng.integers(4)]
            base = f"{number}-{[24, 25, 30, 60][rng.integers(4)]}-{width}x{height}"
        if i >= num_pairs:
            units.append((base,))
        elif rng.random() < 0.7:
            units.append((f"{base}_left", f"{base}_right"))
        else:
            units.append((base, f"{base}{['_left', '_right'][rng.integers(2)]}"))
    return [units[i] for i in rng.permutation(num_units)]


def _unit_splits(unit_sizes, num_videos):
    """About 10% test and 20% validation folders (at least one each when there are three
    or more), the rest train; both sides of a two-person video share a split."""
    targets = [("test", max(1, round(0.1 * num_videos)) if num_videos >= 3 else 0),
               ("validation", max(1, round(0.2 * num_videos)) if num_videos >= 2 else 0)]
    splits, i = ["train"] * len(unit_sizes), 0
    for split, target in targets:
        taken = 0
        while taken < target and i < len(unit_sizes) - 1:   # the last unit stays in train
            splits[i], taken, i = split, taken + unit_sizes[i], i + 1
    return splits


def _annotated_tasks(rng, splits):
    """Each video carries each task with probability 0.65 and at least one task; every
    task then gets at least one video per annotated split, so each split can train and
    evaluate every head."""
    tasks = []
    for split in splits:
        chosen = {t for t in TASKS if rng.random() < 0.65} if split != "test" else set()
        if split != "test" and not chosen:
            chosen.add(TASKS[rng.integers(len(TASKS))])
        tasks.append(chosen)
    for split in SPLITS:
        members = [i for i, s in enumerate(splits) if s == split]
        for task in TASKS:
            if members and not any(task in tasks[i] for i in members):
                tasks[members[rng.integers(len(members))]].add(task)
    return [tuple(t for t in TASKS if t in chosen) for chosen in tasks]


def plan_release(seed: int, generation: str, num_videos: int, frames_per_video: int) -> list:
    """Names, splits, lengths, annotated tasks and image roots of every video folder."""
    plan_seq, video_seq = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.Generator(np.random.PCG64(plan_seq))
    num_pairs = min(rng.binomial(num_videos // 2, 0.2), max(0, num_videos - 3))
    if num_videos >= 5:
        num_pairs = max(1, num_pairs)
    units = _video_names(rng, num_videos - num_pairs, num_pairs)
    order = rng.permutation(len(units))
    unit_splits = [None] * len(units)
    for i, split in zip(order, _unit_splits([len(units[i]) for i in order], num_videos)):
        unit_splits[i] = split
    lengths = [max(5, round(frames_per_video * rng.uniform(0.7, 1.3))) for _ in units]
    # ABAW6 added its last videos (about a quarter) in a second image root.
    roots = LAYOUTS[generation].image_roots
    unit_roots, late = [roots[0]] * len(units), 0
    for i in reversed(range(len(units))):
        if len(roots) == 1 or late >= num_videos // 4:
            break
        unit_roots[i], late = roots[-1], late + len(units[i])
    folders = [(name, split, length, root) for unit, split, length, root
               in zip(units, unit_splits, lengths, unit_roots) for name in unit]
    tasks = _annotated_tasks(rng, [split for _, split, _, _ in folders])
    seeds = video_seq.spawn(len(folders))
    return [VideoPlan(name, split, length, task, root, seed) for (name, split, length, root), task, seed
            in zip(folders, tasks, seeds)]


def _format_va(values, valid, style):
    if valid:
        return f"{values[0]:.3f},{values[1]:.3f}"
    marker = "-5" if style == 0 else "-5.0"
    if style == 2:                              # only one of the two is marked invalid
        return f"{marker},{values[1]:.3f}"
    return f"{marker},{marker}"


def _label_text(task, labels, k, valid, va_style):
    """Frame k's label as a task file (and the MTL file) writes it, or the invalid marker."""
    expr, aus, va = labels
    if task == "expr":
        return str(int(expr[k])) if valid else "-1"
    if task == "au":
        return ",".join(map(str, aus[k].tolist())) if valid else ",".join(["-1"] * 12)
    return _format_va(va[k], valid, va_style)


def _new_split_counts(num_classes):
    return {"videos": 0, "images": 0, "frames": 0, "labelled": {t: 0 for t in ("expr", "au", "va")},
            "expr_class_counts": [0] * num_classes, "au_positive_counts": [0] * 12,
            "skipped": {"image_absent": 0, "no_valid_label": 0}}


def _count_video(counts, defects, labels):
    """Adds one annotated video to its split's ground truth (see generate_release)."""
    expr, aus, _ = labels
    present, valid = defects.present, defects.valid
    any_valid = np.logical_or.reduce([valid[t] for t in TASKS])
    counts["videos"] += 1
    counts["images"] += int(present.sum())
    counts["frames"] += int((present & any_valid).sum())
    for task in TASKS:
        counts["labelled"][task] += int((present & valid[task]).sum())
    expr_frames = present & valid["expr"]
    classes = np.bincount(expr[expr_frames], minlength=len(counts["expr_class_counts"]))
    counts["expr_class_counts"] = [a + int(b) for a, b in zip(counts["expr_class_counts"], classes)]
    positives = aus[present & valid["au"]].sum(axis=0)
    counts["au_positive_counts"] = [a + int(b) for a, b in zip(counts["au_positive_counts"], positives)]
    counts["skipped"]["image_absent"] += int((~present).sum()) + max(defects.extra_lines.values())
    counts["skipped"]["no_valid_label"] += int((present & ~any_valid).sum())


def _mtl_lines(name, defects, labels):
    """s-Aff-Wild2 rows: every frame with an image, invalid markers where a task is not
    annotated for the video or its line is invalid."""
    rows = []
    for k in np.flatnonzero(defects.present).tolist():
        fields = [f"{name}/{k + 1:05d}.jpg"] + [
            _label_text(task, labels, k, defects.valid[task][k], defects.va_style[k])
            for task in ("va", "expr", "au")]
        rows.append(",".join(fields) + "\n")
    return rows


def _check_arguments(seed, generation, mtl_format, num_videos, frames_per_video, jpeg_quality):
    if generation not in LAYOUTS:
        raise ValueError(f"generation must be one of {sorted(LAYOUTS)}, got {generation!r}")
    if mtl_format is not None and mtl_format not in MTL_FILES:
        raise ValueError(f"mtl_format must be None or one of {sorted(MTL_FILES)}, got {mtl_format!r}")
    for name, value, lowest in (("seed", seed, 0), ("num_videos", num_videos, 1),
                                ("frames_per_video", frames_per_video, 5),
                                ("jpeg_quality", jpeg_quality, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lowest:
            raise ValueError(f"{name} must be an integer >= {lowest}, got {value!r}")
    if jpeg_quality > 95:
        raise ValueError(f"jpeg_quality must be at most 95 (PIL's useful maximum), got {jpeg_quality}")


def _write_text(path, header, lines):
    path.write_text("\n".join([header, *lines]) + "\n")


class _Progress:
    """Counts written images and reports every few hundred of them."""

    def __init__(self, report):
        self.report, self.images, self.start = report, 0, time.perf_counter()

    def tick(self):
        self.images += 1
        if self.report is not None and self.images % _PROGRESS_EVERY == 0:
            self.report(self.images, time.perf_counter() - self.start)


def _write_video(out, video, layout, quality, progress):
    """Renders and writes one video folder and its task files; returns what the ground
    truth needs: (defects, labels with binary AUs)."""
    rng = np.random.Generator(np.random.PCG64(video.seed))
    identity = synthetic_faces.sample_identity(rng)
    expr, intensities, va = synthetic_labels.simulate_labels(rng, video.num_frames, layout.num_expr_classes)
    poses = synthetic_labels.simulate_poses(rng, video.num_frames)
    defects = sample_defects(rng, video.num_frames, video.tasks)
    if video.split == "test":
        defects.present[:TEST_FACELESS_ENDS[0]] = False
        defects.present[video.num_frames - TEST_FACELESS_ENDS[1]:] = False
        defects.present[video.num_frames // 2] = True      # at least one face to predict
    noise_offsets = rng.integers(0, 1 << 16, size=(video.num_frames, 2))
    folder = out / video.image_root / video.name
    folder.mkdir(parents=True)
    for k in np.flatnonzero(defects.present).tolist():
        pixels = synthetic_faces.render_face(identity, intensities[k], poses[k], noise_offsets[k])
        (folder / f"{k + 1:05d}.jpg").write_bytes(synthetic_faces.encode_jpeg(pixels, quality))
        progress.tick()
    labels = (expr, (intensities > synthetic_labels.AU_THRESHOLD).astype(np.int64), va)
    for task in video.tasks:
        lines = [_label_text(task, labels, k, defects.valid[task][k], defects.va_style[k])
                 for k in range(video.num_frames)]
        lines += lines[-1:] * defects.extra_lines[task]    # lines for frames that have no image
        task_dir = out / layout.task_roots[task] / layout.split_dirs[video.split]
        _write_text(task_dir / f"{video.name}.txt", task_header(task, layout.num_expr_classes), lines)
    return defects, labels


def _write_test_lists(out, videos, num_classes):
    """The video-name list and the organisers' sample file; what each one names."""
    (out / TEST_LIST).write_text("".join(f"{v.name}\n" for v in videos))
    rows = [f"{v.name}/{k:05d}.jpg" for v in videos for k in range(1, v.num_frames + 1)]
    _write_text(out / TEST_SAMPLE_LIST, f"image_location,{task_header('expr', num_classes)}",
                rows)
    return {TEST_LIST: {"entries": len(videos), "frames": sum(v.num_frames for v in videos)},
            TEST_SAMPLE_LIST: {"entries": len(rows), "frames": len(rows)}}


def generate_release(out_dir, *, seed: int = 0, generation: str = "abaw6",
                     mtl_format: str | None = "abaw4", num_videos: int = 12,
                     frames_per_video: int = 60, jpeg_quality: int = 90,
                     progress=None) -> dict:
    """Writes a synthetic release into `out_dir` (new or empty) and returns its ground
    truth, also saved as `out_dir/ground_truth.json`:

    {"generation", "seed", "num_expr_classes", "image_roots": [folder names],
     "splits": {"train"/"validation": {
         "videos": folders with at least one task file in the split,
         "images": JPEG files of those folders,
         "frames": frames with an image and a valid label in at least one task file,
         "labelled": {"expr", "au", "va"}: frames with an image and a valid label of the task,
         "expr_class_counts": [K] over labelled expr frames,
         "au_positive_counts": [12] over labelled au frames,
         "skipped": {"image_absent": distinct frame numbers of a video that some task file
                         has a line for but that have no JPEG (extra trailing lines included),
                     "no_valid_label": frames with an image and annotation lines but no
                         valid label in any task}},
                "test": {"videos", "images", "frames": {video: N, its frames (faces or
                         not), every one listed in the sample file},
                         "lists": {file name: {"entries": lines after the header,
                                               "frames": frames they name}}}},
     "mtl": {"train"/"validation": {"rows", "labelled": {"expr", "au", "va"}}} or None}

    `progress(images_written, seconds)` is called every few hundred images.
    Same arguments, same bytes.
    """
    _check_arguments(seed, generation, mtl_format, num_videos, frames_per_video, jpeg_quality)
    out = pathlib.Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: a release is written into a new folder")
    layout = LAYOUTS[generation]
    num_classes = layout.num_expr_classes
    plan = plan_release(seed, generation, num_videos, frames_per_video)
    for folder in [*layout.image_roots, *(f"{layout.task_roots[t]}/{layout.split_dirs[s]}"
                                         for t in TASKS for s in SPLITS)]:
        (out / folder).mkdir(parents=True, exist_ok=True)
    counts = {split: _new_split_counts(num_classes) for split in SPLITS}
    test = {"videos": 0, "images": 0, "frames": {}}
    mtl_rows = dict.fromkeys(SPLITS, 0)
    tracker = _Progress(progress)
    with contextlib.ExitStack() as stack:
        mtl_files = {}
        for split, name in (MTL_FILES[mtl_format].items() if mtl_format else ()):
            mtl_files[split] = stack.enter_context(open(out / name, "w"))
            mtl_files[split].write(MTL_HEADER + "\n")
        for video in plan:
            defects, labels = _write_video(out, video, layout, jpeg_quality, tracker)
            if video.split == "test":
                test["videos"] += 1
                test["images"] += int(defects.present.sum())
                test["frames"][video.name] = video.num_frames
                continue
            _count_video(counts[video.split], defects, labels)
            if mtl_files:
                rows = _mtl_lines(video.name, defects, labels)
                mtl_files[video.split].writelines(rows)
                mtl_rows[video.split] += len(rows)
    test["lists"] = _write_test_lists(out, [v for v in plan if v.split == "test"],
                                      num_classes)
    # The MTL files list every frame with an image, so their labelled counts are the split's.
    mtl = {split: {"rows": mtl_rows[split], "labelled": dict(counts[split]["labelled"])}
           for split in SPLITS} if mtl_format else None
    truth = {"generation": generation, "seed": int(seed), "num_expr_classes": num_classes,
             "image_roots": list(layout.image_roots),
             "splits": {**counts, "test": test}, "mtl": mtl}
    (out / GROUND_TRUTH).write_text(json.dumps(truth, indent=2) + "\n")
    return truth


def define_flags(flag_values: flags.FlagValues) -> None:
    flags.DEFINE_string("out", None, "A new or empty folder to write into.",
                        flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "Everything random derives from it.",
                         flag_values=flag_values)
    flags.DEFINE_enum("generation", "abaw6", sorted(LAYOUTS), "The release layout's "
                      "challenge generation.", flag_values=flag_values)
    flags.DEFINE_enum("mtl_format", "abaw4", [*sorted(MTL_FILES), "none"],
                      "s-Aff-Wild2 MTL files to write; 'none' writes none.",
                      flag_values=flag_values)
    flags.DEFINE_integer("num_videos", 12, "Videos in the release.",
                         flag_values=flag_values)
    flags.DEFINE_integer("frames_per_video", 60, "Frames of each video.",
                         flag_values=flag_values)
    flags.DEFINE_integer("jpeg_quality", 90, "JPEG quality of the face images.",
                         flag_values=flag_values)
    flags.mark_flag_as_required("out", flag_values=flag_values)


def main(argv: Sequence[str] | None = None) -> int:
    # The project's one command line (absl flags, no JAX); the generator itself imports
    # nothing from affect_jax.
    from affect_jax import cli  # pylint: disable=g-import-not-at-top
    args, _ = cli.parse_flags(argv, define_flags, __doc__)

    def report(images, seconds):
        print(f"  {images} images, {images / seconds:.0f} images/s", flush=True)

    start = time.perf_counter()
    try:
        truth = generate_release(
            args.out, seed=args.seed, generation=args.generation,
            mtl_format=None if args.mtl_format == "none" else args.mtl_format,
            num_videos=args.num_videos, frames_per_video=args.frames_per_video,
            jpeg_quality=args.jpeg_quality, progress=report)
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(cli.USAGE_ERROR) from None
    seconds = time.perf_counter() - start
    splits = truth["splits"]
    images = sum(splits[s]["images"] for s in ("train", "validation", "test"))
    print(f"wrote {args.generation} release to {args.out}: videos train {splits['train']['videos']}"
          f" / validation {splits['validation']['videos']} / test {splits['test']['videos']},"
          f" {images} images in {seconds:.1f} s ({images / seconds:.0f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
