"""The data path at work: parallel decoding, each process's share, bounded joins. Ratios measured in one run.

    python bench/data_path.py --out runs/bench-data [--images 600 --shards 12]
    python bench/data_path.py --out runs/bench-data3 --only loader,distill --dr runs/bench-data/dr-w0

On an image-text set of 512x384 JPEGs that the script draws itself (gradients, shapes and grain, about the size of
web photos as JPEG):
  1. reinforce (md-teacher-s + md-teacher-m, random weights, no captioner, K=10, views at 256 px): images/s with
     --num-workers 2 over 0 (goal >= 1.5x); the two datasets must be identical, member by member. Also the
     teachers alone on ready views: no run can embed faster, so their rate over the 0-worker run's bounds the ratio.
  2. the loader alone over that reinforced set (decode + replay the stored view + normalize, to 256 px, no model):
     samples/s with 2 workers over 0 (goal >= 1.8x).
  3. distill md-student-tiny at 64 px on it: steps/s with --num-workers 2 over 0 (goal >= 1.4x).
  For 2 and 3 also the cores busy while timed (CPU seconds over wall seconds, of the process and of its workers):
  on 2 cores a run doing W CPU-seconds of work a step cannot exceed 2 / W steps/s, which bounds the ratio.
  4. two processes (torchrun, one data worker each) distilling within one epoch of their shares: bytes each process
     read from the shards over the dataset's bytes (goal <= 0.55).
  5. an embeddings-only (DataCompDR-layout) version of 2000 and of 500 of the images: peak resident memory of
     `distill --images` and `inspect --images --html` on 2000 minus on 500 (goal < 60 MB), each in its own process.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the command line sets it, before torch loads

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

REPO = Path(__file__).parents[1]
sys.path.insert(0, str(REPO))

from mdmodels import load_model, save_model_dir  # noqa: E402
from reinforced_data.augment import AugmentationConfig  # noqa: E402
from reinforced_data.examples import DistillExamples, ReinforcedSource  # noqa: E402
from reinforced_data.pipeline import ExampleStream, make_loader  # noqa: E402
from reinforced_data.reader import read_info  # noqa: E402
from teachers.reinforce import ReinforceConfig, reinforce  # noqa: E402

WORDS = ("red", "blue", "green", "orange", "circle", "square", "triangle", "over", "a", "sky", "field", "city")


def photo(index: int) -> bytes:
    """A 512x384 JPEG with some structure (a gradient, shapes) and grain, like a web photo as JPEG (~40-60 KB)."""
    rng = np.random.default_rng(index)
    top, bottom = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
    ramp = np.linspace(0, 1, 384)[:, None, None]
    pixels = (top * (1 - ramp) + bottom * ramp) * np.ones((1, 512, 1))
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y, r = rng.integers(0, 512), rng.integers(0, 384), rng.integers(20, 120)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    image = image.filter(ImageFilter.GaussianBlur(1.5))
    grain = rng.normal(0, 6, (384, 512, 3))
    image = Image.fromarray(np.clip(np.asarray(image) + grain, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_photo_set(root: Path, count: int, shards: int) -> Path:
    root.mkdir(parents=True)
    sinks = [wds.TarWriter(str(root / f"{i:05d}.tar")) for i in range(shards)]
    for n in range(count):
        rng = np.random.default_rng(n)
        caption = " ".join(rng.choice(WORDS, 6)) + "."
        sinks[n % shards].write({"__key__": f"photo-{n:06d}", "jpg": photo(n), "txt": caption})
    for sink in sinks:
        sink.close()
    return root


def dataset_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.tar"))


def members(directory: Path) -> dict[str, bytes]:
    out = {}
    for path in sorted(directory.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                out[f"{path.name}/{m.name}"] = tar.extractfile(m).read()
    return out


def cpu_seconds(process: psutil.Process) -> tuple[float, float]:
    """CPU seconds (user + system) used so far by `process` and by its live descendants (its data workers)."""
    own, workers = process.cpu_times(), 0.0
    for member in process.children(recursive=True):
        try:
            times = member.cpu_times()
        except psutil.NoSuchProcess:
            continue
        workers += times.user + times.system
    return own.user + own.system, workers


def busy_cores(first: tuple[float, float], last: tuple[float, float], wall: float) -> tuple[float, float]:
    """Cores the process and its workers kept busy between two `cpu_seconds` samples `wall` seconds apart."""
    return (last[0] - first[0]) / wall, (last[1] - first[1]) / wall


def loader_rate(dataset: Path, workers: int, batch: int, batches: int) -> tuple[float, tuple[float, float]]:
    """Samples/s of the pipeline alone, from the first batch to the last (worker start-up excluded), and the cores
    the process and its workers kept busy meanwhile."""
    info = read_info(dataset)
    source = ReinforcedSource(info, None, seed=0, aug_sampling="random")
    examples = DistillExamples(info.augmentation, 256, (0.5,) * 3, (0.5,) * 3, seed=0, teacher_views=False)
    stream = ExampleStream(info.shards, source, examples, batch, 0, 256, num_workers=workers)
    loader = iter(make_loader(stream, workers, seed=0))
    next(loader)
    me = psutil.Process()
    start, cpu = time.perf_counter(), cpu_seconds(me)
    for _ in range(batches):
        next(loader)
    wall = time.perf_counter() - start
    return batches * batch / wall, busy_cores(cpu, cpu_seconds(me), wall)


def reinforce_input_rate(photos: Path, workers: int, num_augs: int) -> float:
    """Images/s of reinforce's input pipeline alone (decode, draw and replay K views at 256 px), no teacher."""
    from reinforced_data.shards import resolve_shards
    from teachers.reinforce import _InputShards

    config = ReinforceConfig(num_augs=num_augs, num_captions=0, augmentation=AugmentationConfig(size=256))
    todo = list(enumerate(resolve_shards(str(photos))))
    start, images = time.perf_counter(), 0
    for prepared in make_loader(_InputShards(todo, config, []), workers, seed=0):
        images += len(prepared.samples)
    return images / (time.perf_counter() - start)


def teachers_rate(teachers: list[str], num_augs: int, batches: int = 4) -> float:
    """Images/s of the two teachers alone: K views at 256 px (each teacher resizes them) and one caption each."""
    from teachers import load_ensemble

    ensemble = load_ensemble(teachers)
    per_batch = 256 // num_augs
    views = torch.rand(per_batch * num_augs, 3, 256, 256)
    captions = ["a red circle over a blue field."] * per_batch
    ensemble.encode_image_tensors(views)
    start = time.perf_counter()
    for _ in range(batches):
        ensemble.encode_image_tensors(views)
        ensemble.encode_texts(captions)
    return batches * per_batch / (time.perf_counter() - start)


def steps_per_second(run: Path, warmup: int) -> float:
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] >= warmup]
    return (timed[-1]["step"] - timed[0]["step"]) / (timed[-1]["elapsed_s"] - timed[0]["elapsed_s"])


def distill_run(argv: list[str], run: Path, warmup: int, steps: int) -> tuple[float, tuple[float, float]]:
    """Steps/s of `mobiledistill distill argv` over its logged steps from `warmup` on, and the cores its process and
    workers kept busy over the same steps: CPU seconds sampled as its progress bar reaches each step (the log is
    written only at checkpoints)."""
    errors_path = run.parent / f"{run.name}.stderr"
    with open(errors_path, "w") as errors:
        child = subprocess.Popen([sys.executable, "-m", "distill", *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                                 stderr=errors)
    process, marks = psutil.Process(child.pid), {}
    while child.poll() is None and steps not in marks:
        counts = re.findall(rf"(\d+)/{steps} \[", errors_path.read_text(errors="replace"))
        done = int(counts[-1]) if counts else 0
        if done > warmup and done not in marks:
            marks[done] = cpu_seconds(process), time.perf_counter()
        time.sleep(0.02)
    if child.wait():
        raise SystemExit(f"distill {' '.join(argv)} failed: see {errors_path}")
    (cpu0, wall0), (cpu1, wall1) = marks[min(marks)], marks[max(marks)]
    return steps_per_second(run, warmup), busy_cores(cpu0, cpu1, wall1 - wall0)


def cli(argv: list[str]) -> None:
    """`mobiledistill argv` in its own process (the timings include its start-up, as a user's run does)."""
    result = subprocess.run([sys.executable, "-m", "distill", *argv], cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(argv)} failed: {result.stderr[-2000:]}")


def peak_rss_mb(argv: list[str]) -> float:
    """Peak resident memory (MB) of `mobiledistill argv` run in its own process."""
    # VmHWM, the peak of this process's own memory (ru_maxrss would carry the parent's over fork and exec)
    code = ("import re, sys; from mobiledistill.cli import main; code = main(sys.argv[1:]); "
            "print('PEAK', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
            "sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(argv)} failed: {result.stderr[-2000:]}")
    line = next(x for x in result.stdout.splitlines() if x.startswith("PEAK"))
    return int(line.split()[1]) / 1024


def _busy(name: str, cores: dict[int, tuple[float, float]], unit: str, rates: dict[int, float]) -> str:
    """A note on where a ratio stands against the two cores: the cores busy (the process, its workers), the CPU
    time per unit, and the bound that 2 cores put on the ratio given the 2-worker run's own work (2 / W units/s
    over the 0-worker rate)."""
    work = {w: sum(cores[w]) / rates[w] for w in cores}  # CPU seconds per unit
    bound = 2 / work[2] / rates[0]
    return (f"{name}: busy cores {sum(cores[0]):.2f} with 0 workers; with 2, {sum(cores[2]):.2f} "
            f"({cores[2][0]:.2f} the process, {cores[2][1]:.2f} its workers); CPU ms per {unit} {work[0] * 1e3:.1f} "
            f"and {work[2] * 1e3:.1f}; 2 cores bound the ratio at {bound:.2f}")


PARTS = ("reinforce", "loader", "distill", "processes", "join")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-data")
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--shards", type=int, default=12)
    parser.add_argument("--num-augs", type=int, default=10)
    parser.add_argument("--distill-steps", type=int, default=25)
    parser.add_argument("--join-sizes", default="500,2000", help="sizes of the two embeddings-only sets")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated measures among {','.join(PARTS)} (default: all); without reinforce, "
                             "the others read the reinforced set --dr")
    parser.add_argument("--dr", default=None, help="a reinforced set of this script's photos (dr-w0 of an earlier "
                        "--out), for --only without reinforce")
    args = parser.parse_args()
    parts = [x.strip() for x in args.only.split(",") if x.strip()]
    if unknown := sorted(set(parts) - set(PARTS)):
        parser.error(f"--only: unknown measures {unknown} (choose among {', '.join(PARTS)})")
    if "reinforce" not in parts and not args.dr and set(parts) & {"loader", "distill", "processes"}:
        parser.error("--only without reinforce needs --dr, a reinforced set to read")
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    results = {}
    teachers = []
    if set(parts) & {"reinforce", "join"}:
        for arch in ("md-teacher-s", "md-teacher-m"):
            torch.manual_seed(0)
            loaded = load_model(arch, warn_random=False)
            teachers.append(str(save_model_dir(loaded.model, loaded.model_cfg, out / arch,
                                               tokenizer=loaded.tokenizer)))
    dr = out / "dr-w0" if "reinforce" in parts else Path(args.dr or "")  # the set reinforce makes, else --dr
    notes = []  # printed below the table, which they would break
    print("\n| measure | 0 workers | 2 workers | ratio | goal |", flush=True)
    print("|---|---|---|---|---|", flush=True)

    if "reinforce" in parts:
        photos = write_photo_set(out / "photos", args.images, args.shards)
        notes.append(f"{args.images} JPEGs of 512x384 in {args.shards} shards, "
                     f"{dataset_bytes(photos) / args.images / 1024:.0f} KiB each")
        rates = {}
        for workers in (0, 2):  # the command line in a fresh process each, as a user runs it
            start = time.perf_counter()
            cli(["reinforce", "--data", str(photos), "--teacher", teachers[0], "--teacher", teachers[1],
                 "--num-augs", str(args.num_augs), "--num-captions", "0", "--aug-size", "256", "--dtype", "fp16",
                 "--num-workers", str(workers), "--out", str(out / f"dr-w{workers}")])
            rates[workers] = args.images / (time.perf_counter() - start)
        identical = members(out / "dr-w0") == members(out / "dr-w2")
        # where a reinforce run's time goes: its input pipeline alone, and the teachers alone on ready views
        pipeline_rates = {w: reinforce_input_rate(photos, w, args.num_augs) for w in (0, 2)}
        teacher_rate = teachers_rate(teachers, args.num_augs)
        bound = teacher_rate / rates[0]  # no run embeds faster than the teachers alone
        results["reinforce"] = {"images_per_s": rates, "ratio": rates[2] / rates[0], "identical": identical,
                                "input_pipeline_images_per_s": pipeline_rates, "teachers_images_per_s": teacher_rate,
                                "ratio_bound": bound}
        print(f"| reinforce, K={args.num_augs}, images/s | {rates[0]:.1f} | {rates[2]:.1f} | "
              f"{rates[2] / rates[0]:.2f} | >= 1.5 |", flush=True)
        notes.append(f"reinforce outputs identical with 0 and 2 workers: {identical}; its input pipeline alone: "
                     f"{pipeline_rates[0]:.1f} images/s with 0 workers, {pipeline_rates[2]:.1f} with 2; the two "
                     f"teachers alone: {teacher_rate:.1f} images/s, which bound the ratio at "
                     f"{bound:.2f} (no data path at all, the teachers on both cores)")

    if "loader" in parts:
        batch = 32
        measured = {w: loader_rate(dr, w, batch, (2 * args.images) // batch) for w in (0, 2)}
        loader, cores = {w: m[0] for w, m in measured.items()}, {w: m[1] for w, m in measured.items()}
        results["loader"] = {"samples_per_s": loader, "ratio": loader[2] / loader[0], "busy_cores": cores}
        print(f"| loader alone to 256 px, samples/s | {loader[0]:.0f} | {loader[2]:.0f} | "
              f"{loader[2] / loader[0]:.2f} | >= 1.8 |", flush=True)
        notes.append(_busy("loader", cores, "sample", loader))

    if "distill" in parts:
        distill_rates, cores = {}, {}
        for workers in (0, 2):
            run = out / f"distill-w{workers}"
            distill_rates[workers], cores[workers] = distill_run(
                ["distill", "--data", str(dr), "--out", str(run), "--steps", str(args.distill_steps), "--batch-size",
                 "64", "--num-workers", str(workers), "log_every=1", "warmup_steps=2", "eval_split=none"],
                run, warmup=3, steps=args.distill_steps)
        results["distill"] = {"steps_per_s": distill_rates, "ratio": distill_rates[2] / distill_rates[0],
                              "busy_cores": cores}
        print(f"| distill md-student-tiny 64 px, steps/s | {distill_rates[0]:.3f} | {distill_rates[2]:.3f} | "
              f"{distill_rates[2] / distill_rates[0]:.2f} | >= 1.4 |", flush=True)
        notes.append(_busy("distill", cores, "step", distill_rates))

    print("\n" + "\n".join(notes) if notes else "", flush=True)

    if "processes" in parts:
        # Three quarters of an epoch of each process's half at 32 samples a process a step: its shuffle buffer
        # (2000) holds its whole share, so what it read is its share once, with no prefetch into the next epoch.
        steps = max(1, (3 * args.images) // (4 * 64))
        env = dict(os.environ, PYTHONPATH=str(REPO))
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "distill", "distill", "--data", str(dr), "--out", str(out / "two-processes"),
                              "--steps", str(steps), "--batch-size", "64", "--num-workers", "1", "eval_split=none"],
                             cwd=REPO, env=env, capture_output=True, text=True)
        if two.returncode:
            raise SystemExit(f"two-process run failed: {two.stderr[-3000:]}")
        provenance = json.loads((out / "two-processes" / "mobiledistill.json").read_text())
        per_process = provenance["train"]["data"]["bytes_read_per_process"]
        total = dataset_bytes(dr)
        fractions = [b / total for b in per_process]
        results["two_processes"] = {"steps": steps, "dataset_bytes": total, "bytes_read_per_process": per_process,
                                    "fraction": fractions}
        print(f"two processes, {steps} steps (within one epoch of each share): bytes read / dataset bytes = "
              f"{', '.join(f'{f:.3f}' for f in fractions)} (goal <= 0.55)", flush=True)

    if "join" in parts:
        small, large = (int(n) for n in args.join_sizes.split(","))
        memory = {}
        for count in (small, large):
            images = write_photo_set(out / f"join-images-{count}", count, max(1, count // 100))
            bare = out / f"join-dr-{count}"
            reinforce(str(images), teachers[:1], bare, ReinforceConfig(
                num_augs=2, num_captions=0, store_images=False, augmentation=AugmentationConfig(size=64)),
                progress=False)
            memory[count] = {
                "distill": peak_rss_mb(["distill", "--data", str(bare), "--images", str(images), "--out",
                                        str(out / f"join-run-{count}"), "--steps", "40", "--batch-size", "64",
                                        "--num-workers", "0", "shuffle_buffer=256", "eval_split=none"]),
                "inspect": peak_rss_mb(["inspect", str(bare), "--images", str(images), "--html",
                                        str(out / f"join-{count}.html")]),
            }
        results["join_memory_mb"] = {**{str(k): v for k, v in memory.items()},
                                     "growth": {k: memory[large][k] - memory[small][k] for k in ("distill", "inspect")}}
        print(f"peak RSS, {small} -> {large} samples: distill --images {memory[small]['distill']:.0f} -> "
              f"{memory[large]['distill']:.0f} MB, inspect --images {memory[small]['inspect']:.0f} -> "
              f"{memory[large]['inspect']:.0f} MB (goal: growth < 60 MB)")

    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"ru_maxrss of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
