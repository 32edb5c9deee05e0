"""Input pipelines: throughput, build time and memory per rank; on a GPU, the one-command check of the GPU decode path.

    .venv/bin/python bench/data.py                  # 32px and 224px on the CPU, and on the GPU if torch sees one
    .venv/bin/python bench/data.py --devices gpu --data /imagenet/val --index-files 0
    .venv/bin/python bench/data.py --devices cpu --dry-run --seconds 2   # GPU checks, the CPU standing in

Per (output size, device), each in a fresh process (DALI's memory pools live until their process exits, so one
configuration's pools must not count in the next), one rank's `pretrain_loader(views=2)`:
- images/s (an image = one decode + two augmented views, counted as tensors reach torch) over --seconds of
  batches after the first, and images per CPU second over the same batches (this process's CPU time, DALI's
  threads included: steadier than wall time on a shared machine);
- build: seconds from `pretrain_loader(...)` to its first batch, what the trainer pays every epoch (median of 3);
  bench/harness.py times both (the batches' times summed, the builds' median) and build_index below;
- peak GPU memory above the process's CUDA baseline (cudaMemGetInfo, so DALI's pools count as well as torch's),
  peak host RSS above the baseline (DALI's pinned pools are resident, so they count), and the decoder's pools
  that the rule of data/decoder.py reserves (threads x device padding / 2 x threads x host padding).
On a GPU, also (what no CPU run can tell):
- CPU vs GPU pixels of the evaluation view (same files, same order), in 0..255 levels, and of the decoded
  images themselves with the mixed decoder's jpeg_fancy_upsampling on (as the loaders use it) and off;
- how instance ids come back when a GPU pipeline leaves them as a CPU output (pinned memory would make torch 2.13
  raise "BufferError: Unsupported device_type: 3"; the loaders move ids to the GPU inside the pipeline).
Inputs: 32px = the built-in MNIST-5k train split (4000 32x32 JPEGs). 224px = --data, else synthetic JPEGs of
ImageNet's common shapes (500x375, 375x500, 500x333, 333x500, 500x500) with one in 16 larger (up to 2048x1536),
smooth colour fields plus grain at quality 90: ~100 KB at 500x375 like an average ImageNet training file.
Indexing writes --index-files tiny JPEGs into 100 class folders and times `build_index` (page cache warm).
"""
import argparse
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import nvidia.dali  # noqa: E402  (after torch, as in data/)
from nvidia.dali import fn, pipeline_def, types  # noqa: E402
from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: E402

from bench.harness import memory_in_use, peak_memory, provenance, time_ms, times_ms  # noqa: E402
from data.augment import IMAGENET_STD  # noqa: E402  (needs the path above)
from data.builtin import builtin_dataset  # noqa: E402
from data.decoder import decoder_arguments  # noqa: E402
from data.index import InstanceIndex, build_index  # noqa: E402
from data.loaders import eval_loader, pretrain_loader  # noqa: E402
import trainer  # noqa: E402

PHOTO_SHAPES = [(500, 375), (375, 500), (500, 333), (333, 500), (500, 500)]  # width, height
LARGE_PHOTO_SHAPES = [(1024, 768), (1600, 1200), (2048, 1536)]  # one photo in LARGE_PHOTO_EVERY
LARGE_PHOTO_EVERY = 16
GRAIN_SIGMA = 20  # grey levels; makes the quality-90 files ~100 KB at 500x375, near ImageNet's ~110 KB average
BUILDS = 3  # loader builds timed per configuration
PILOT_BATCHES = 3  # timed batches that size a configuration's run to --seconds
COMPARED_IMAGES = 256  # images compared between the CPU and the GPU decoder
MIB = 2**20
DALI_DEFAULT_PADDING = dict(device_memory_padding=16 * MIB, host_memory_padding=8 * MIB)  # per decoder thread
ONE_RANK = argparse.Namespace(rank=0, size=1, device=None)  # the loaders' group: one rank, batches left where made


def run_config(index, image_size, device, batch_size, threads, seed=0):
    """The config of a run over `index` with these settings (trainer.py's dataset defaults otherwise), as the
    loaders read it."""
    return trainer.resolve_config(trainer.parser.parse_args([
        "--data", str(index.root), "--image-size", str(image_size), "--dali-device", device,
        "--batch-size", str(batch_size), "--threads", str(threads), "--seed", str(seed)]))


def write_photos(folder, count):
    """Synthetic photo-like JPEGs of mixed sizes: bicubic-upsampled random colour fields plus Gaussian grain."""
    generator = np.random.default_rng(0)
    for number in range(count):
        shapes = LARGE_PHOTO_SHAPES if number % LARGE_PHOTO_EVERY == LARGE_PHOTO_EVERY - 1 else PHOTO_SHAPES
        width, height = shapes[number % len(shapes)]
        coarse = generator.integers(0, 256, (height // 25, width // 25, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(smooth + generator.normal(0, GRAIN_SIGMA, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"photo{number:04d}.jpg", quality=90)  # [H, W, 3]


def gpu_bytes_in_use():
    free, total = torch.cuda.mem_get_info()
    return total - free


def batches_without_end(loader):
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def measure_loader(index_path, image_size, device, batch_size, threads, seconds):
    """One configuration, run in a fresh process: rates, build time, peak memory (see the module docstring)."""
    index = InstanceIndex.load(index_path)
    on_gpu = device == "gpu"
    if on_gpu:
        gpu_baseline = gpu_bytes_in_use()  # after creating the CUDA context
    host_baseline = memory_in_use("cpu")
    arguments = (image_size, device, batch_size, threads)

    def build(seed):  # what the trainer pays every epoch; the loader is closed off the clock
        loader = pretrain_loader(index, run_config(index, *arguments, seed), 0, ONE_RANK)
        next(iter(loader))
        return loader
    seeds = iter(range(BUILDS))
    build_ms = time_ms(build, BUILDS, inputs=lambda: (next(seeds),), finish=lambda loader: loader.close())
    gpu_peaks, images = [0], []
    with pretrain_loader(index, run_config(index, *arguments, BUILDS), 0, ONE_RANK) as loader:
        batches = batches_without_end(loader)

        def fetch():
            _, ids = next(batches)
            images.append(len(ids))
        # Only views that are ready count; the memory is read off the clock.
        timing = dict(stop=torch.cuda.synchronize if on_gpu else None,
                      finish=(lambda _: gpu_peaks.append(gpu_bytes_in_use() - gpu_baseline)) if on_gpu else None)
        # The first batch (pipeline built and warm) is dropped; PILOT_BATCHES size the run to `seconds`.
        pilot_ms = time_ms(fetch, PILOT_BATCHES, warmup=1, **timing)
        repeats = max(PILOT_BATCHES, round(seconds * 1e3 / pilot_ms))
        cpu_started = time.process_time()
        batch_ms = times_ms(fetch, repeats, **timing)  # a rate: the total over the total, slow batches included
        cpu_seconds = time.process_time() - cpu_started
    timed_images = sum(images[-repeats:])
    host_peak = peak_memory("cpu") - host_baseline
    padding = {**DALI_DEFAULT_PADDING, **decoder_arguments(index, device, training=True)}
    return dict(rate=timed_images * 1e3 / sum(batch_ms), cpu_rate=timed_images / cpu_seconds,
                build=build_ms / 1e3, gpu_peak=max(gpu_peaks) if on_gpu else None, host_peak=host_peak,
                pools=(threads * padding["device_memory_padding"], 2 * threads * padding["host_memory_padding"])
                if on_gpu else None)


@pipeline_def
def decode_pipeline(index, decoder, side=None):
    """Files in id order, decoded with the `decoder` arguments (resized to side x side if given), and their ids
    left as a CPU output."""
    encoded, ids = fn.readers.file(file_root=str(index.root), file_list=str(index.file_list), name="files")
    images = fn.decoders.image(encoded, output_type=types.RGB, **decoder)
    return (images if side is None else fn.resize(images, size=[side, side])), ids


def device_id(decoder):
    return None if decoder["device"] == "cpu" else torch.cuda.current_device()


def decoded_images(index, decoder, batch_size, threads):
    """The first COMPARED_IMAGES decoded images of `index` as HWC uint8 arrays."""
    pipeline = decode_pipeline(index, decoder, batch_size=batch_size, num_threads=threads, device_id=device_id(decoder))
    images = []
    while len(images) < min(COMPARED_IMAGES, index.num_instances):
        batch, _ = pipeline.run()
        images += [np.array(image) for image in (batch.as_cpu() if decoder["device"] == "mixed" else batch)]
    return images[:COMPARED_IMAGES]


def difference(first, second):
    """(max, mean) |first - second| over paired uint8 or float arrays, in the arrays' units."""
    gaps = [np.abs(a.astype(np.float64) - b.astype(np.float64)) for a, b in zip(first, second)]
    return max(gap.max() for gap in gaps), float(np.mean([gap.mean() for gap in gaps]))


def eval_view_difference(index, image_size, batch_size, threads, device):
    """(max, mean) |CPU - `device`| of the evaluation view over the first COMPARED_IMAGES images, in 0..255 levels."""
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    views = {}
    for device in ("cpu", device):
        with eval_loader(index, run_config(index, image_size, device, batch_size, threads), group=ONE_RANK) as loader:
            batches = []
            for images, ids in loader:
                batches.append((images.cpu() * std, ids.cpu()))  # normalized -> levels; the mean cancels
                if sum(len(batch_ids) for _, batch_ids in batches) >= COMPARED_IMAGES:
                    break
        views[device] = batches
    if any(not torch.equal(a, b) for (_, a), (_, b) in zip(views["cpu"], views[device])):
        raise AssertionError(f"the cpu and {device} evaluation loaders returned different ids")
    return difference([images.numpy() for images, _ in views["cpu"]], [images.numpy() for images, _ in views[device]])


def ids_as_cpu_output(index, decoder, batch_size, threads):
    """What a GPU pipeline's CPU output (the ids) becomes in torch: its device and whether pinned, or the error."""
    pipeline = decode_pipeline(index, decoder, side=32, batch_size=batch_size, num_threads=threads,
                               device_id=device_id(decoder))
    try:
        (batch,) = next(DALIGenericIterator(pipeline, ["images", "ids"], reader_name="files"))
    except BufferError as error:
        return f"BufferError: {error}"
    return f"{batch['ids'].device}, pinned={batch['ids'].is_pinned()}"


def gpu_checks(indexes, batch_size, threads, device):
    """The pixel comparisons and the ids probe on `device` ('gpu', or 'cpu' standing in for it in a dry run, where
    every difference must be 0); {name: result line}."""
    decoder = dict(device="mixed" if device == "gpu" else "cpu")
    lines = {}
    for image_size, index_path in indexes.items():
        index = InstanceIndex.load(index_path)
        largest, mean = eval_view_difference(index, image_size, batch_size, threads, device)
        lines[f"eval view {image_size}px, |cpu - {device}|"] = f"max {largest:.2f}, mean {mean:.4f} levels"
        cpu = decoded_images(index, dict(device="cpu"), batch_size, threads)
        for fancy in (True, False):
            other = decoded_images(index, dict(decoder, jpeg_fancy_upsampling=fancy), batch_size, threads)
            largest, mean = difference(cpu, other)
            lines[f"decoded {image_size}px input, {decoder['device']} decoder with jpeg_fancy_upsampling={fancy}, "
                  f"|cpu - {device}|"] = f"max {largest:.0f}, mean {mean:.4f} levels"
    index = InstanceIndex.load(next(iter(indexes.values())))
    lines[f"ids left as a CPU output of a {device} pipeline"] = ids_as_cpu_output(index, decoder, batch_size, threads)
    with eval_loader(index, run_config(index, 32, device, batch_size, threads), group=ONE_RANK) as loader:
        _, ids = next(iter(loader))
        lines[f"ids from the loaders on the {device} path"] = f"{ids.device}, {ids.dtype}"
    return lines


def in_fresh_process(function, *arguments):
    """function(*arguments) in a new spawned process (its own CUDA context and DALI pools)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *arguments).result()


def index_files_per_second(folder, count):
    """Files/s of build_index over `count` tiny JPEGs in 100 class folders."""
    payload = next(builtin_dataset().glob("train/0/*.jpg")).read_bytes()
    for number in range(count):
        path = folder / f"class{number % 100:03d}" / f"image{number:07d}.jpg"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(payload)
    milliseconds = time_ms(lambda: build_index(folder, out_dir=folder.parent / "index", log=lambda message: None), 1)
    return count * 1e3 / milliseconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224],
                        help="output side S in pixels; <= 64 reads the built-in digits (default: 32 224)")
    parser.add_argument("--devices", nargs="+", choices=["cpu", "gpu"], default=None,
                        help="decode devices (default: cpu, plus gpu when torch sees CUDA)")
    parser.add_argument("--data", type=Path, default=None,
                        help="image folder for the sizes > 64 (default: synthetic photos, see --photos)")
    parser.add_argument("--batch-size", type=int, default=128, help="images PER RANK per batch (default: 128)")
    parser.add_argument("--threads", type=int, default=4, help="DALI threads per rank, the trainer's (default: 4)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="about this many timed seconds per configuration (default: 10)")
    parser.add_argument("--photos", type=int, default=512, help="synthetic JPEGs for sizes > 64 (default: 512)")
    parser.add_argument("--index-files", type=int, default=100_000, help="files to index, 0 skips (default: 100000)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run the GPU checks with the CPU standing in for the GPU (default: off)")
    args = parser.parse_args()
    devices = args.devices or ["cpu"] + (["gpu"] if torch.cuda.is_available() else [])
    if "gpu" in devices and not torch.cuda.is_available():
        parser.error("--devices gpu: torch sees no CUDA device")
    if args.data is not None and not args.data.is_dir():
        parser.error(f"--data {args.data} is not a folder")
    print(provenance(nvidia.dali))
    print(f"batch {args.batch_size} per rank, {args.threads} DALI threads, {args.seconds:g} s per configuration")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        quiet = dict(out_dir=scratch / "index", log=lambda message: None)
        inputs = {}
        for size in args.sizes:
            if size <= 64:
                inputs[size] = ("MNIST-5k train, 32x32", build_index(builtin_dataset() / "train", **quiet))
            elif args.data is not None:
                inputs[size] = (str(args.data), build_index(args.data, **quiet))
            else:
                if not (scratch / "photos").exists():
                    (scratch / "photos").mkdir()
                    write_photos(scratch / "photos", args.photos)
                inputs[size] = ("synthetic photos, mixed sizes", build_index(scratch / "photos", **quiet))
        print("\n| output | input | device | images/s per rank (2 views each) | images per CPU second | build + first "
              "batch (s) | peak GPU memory (MiB) | peak host RSS growth (MiB) | decoder pools by the rule, GPU / "
              "pinned (MiB) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for size, (description, index) in inputs.items():
            for device in devices:
                result = in_fresh_process(measure_loader, index.path, size, device, args.batch_size, args.threads,
                                          args.seconds)
                gpu = "" if result["gpu_peak"] is None else f"{result['gpu_peak'] / MIB:,.0f}"
                pools = "" if result["pools"] is None else " / ".join(f"{part / MIB:,.0f}" for part in result["pools"])
                print(f"| {size}px | {description} | {device} | {result['rate']:,.0f} | {result['cpu_rate']:,.0f} | "
                      f"{result['build']:.2f} | {gpu} | {result['host_peak'] / MIB:,.0f} | {pools} |", flush=True)
        if "gpu" in devices or args.dry_run:
            indexes = {size: index.path for size, (_, index) in inputs.items()}
            checked = "cpu" if args.dry_run else "gpu"
            print()
            for name, line in in_fresh_process(gpu_checks, indexes, args.batch_size, args.threads, checked).items():
                print(f"{name}: {line}", flush=True)
        if args.index_files:
            (scratch / "tree").mkdir()
            rate = index_files_per_second(scratch / "tree", args.index_files)
            print(f"\nbuild_index: {args.index_files:,} files in 100 class folders at {rate:,.0f} files/s "
                  f"-> 1,281,167 ImageNet files in ~{1_281_167 / rate:.0f} s")


if __name__ == "__main__":
    main()
