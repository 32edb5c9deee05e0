"""Input throughput: images/s of one rank's pretraining pipeline (2 views), and files/s of the instance index.

    .venv/bin/python bench/data.py                      # 32px and 224px, CPU (and GPU when torch sees one)
    .venv/bin/python bench/data.py --sizes 224 --threads 8 --devices gpu

One rank = one process with one DALI pipeline of --threads CPU threads; a Horovod job runs one per rank, so
per-rank figures multiply by the ranks that have their own cores (or GPU). An image is one decode and two
augmented views (`pretrain_loader(views=2)`), counted from the tensors that reach torch.
Inputs: 32px is the built-in MNIST-5k train split (4000 JPEGs of 32x32). 224px is a synthetic stand-in for
ImageNet (no dataset downloads here): 500x375 JPEGs at quality 90, smooth colour fields plus grain, ~100 KB
each like an average ImageNet training file, so decode cost is comparable but not identical.
Indexing writes --index-files tiny JPEGs into 100 class folders and times `build_index` (page cache warm).
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.builtin import builtin_dataset  # noqa: E402  (needs the path above)
from data.index import build_index  # noqa: E402
from data.pipelines import pretrain_loader  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224], help="output side S in pixels (default: 32 224)")
parser.add_argument("--devices", nargs="+", default=None,
                    help="cpu and/or gpu (default: cpu, plus gpu when torch sees CUDA)")
parser.add_argument("--batch-size", type=int, default=128, help="images PER RANK per batch (default: 128)")
parser.add_argument("--threads", type=int, default=os.cpu_count(), help="DALI CPU threads (default: all cores)")
parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per configuration (default: 10)")
parser.add_argument("--photos", type=int, default=512, help="synthetic 500x375 JPEGs for 224px (default: 512)")
parser.add_argument("--index-files", type=int, default=100_000, help="files to index, 0 skips (default: 100000)")
args = parser.parse_args()

PHOTO_SIZE = (500, 375)  # width, height: the most common ImageNet training shape
GRAIN_SIGMA = 20  # grey levels; makes the quality-90 files ~100 KB, near ImageNet's ~110 KB average


def write_photos(folder, count):
    """Synthetic photo-like JPEGs: bicubic-upsampled random colour fields plus Gaussian grain."""
    generator = np.random.default_rng(0)
    width, height = PHOTO_SIZE
    for number in range(count):
        coarse = generator.integers(0, 256, (height // 25, width // 25, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize(PHOTO_SIZE, Image.BICUBIC), dtype=np.float32)
        grain = generator.normal(0, GRAIN_SIGMA, smooth.shape)
        pixels = np.clip(smooth + grain, 0, 255).astype(np.uint8)  # [375, 500, 3]
        Image.fromarray(pixels).save(folder / f"photo{number:04d}.jpg", quality=90)


def images_per_second(index, image_size, device):
    """Steady-state (images per wall second, images per CPU second) of a 2-view pretraining loader.

    CPU seconds are this process's, DALI's threads included: on a shared machine they still tell what one
    core delivers, where the wall-clock rate depends on what else runs.
    """
    loader = pretrain_loader(index, batch_size=args.batch_size, image_size=image_size, views=2, device=device,
                             threads=args.threads)
    images, started = 0, None
    while True:
        for views, ids in loader:
            if views[0].is_cuda:
                torch.cuda.synchronize()  # count only views that are ready
            if started is None:  # after the first batch: pipeline built and warm
                started, cpu_started = time.perf_counter(), time.process_time()
                continue
            images += len(ids)
            elapsed = time.perf_counter() - started
            if elapsed >= args.seconds:
                return images / elapsed, images / (time.process_time() - cpu_started)


def index_files_per_second(folder, count):
    """Files/s of build_index over `count` tiny JPEGs in 100 class folders."""
    payload = next(builtin_dataset().glob("train/0/*.jpg")).read_bytes()
    for number in range(count):
        path = folder / f"class{number % 100:03d}" / f"image{number:07d}.jpg"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(payload)
    started = time.perf_counter()
    build_index(folder, out_dir=folder.parent / "index", log=lambda message: None)
    return count / (time.perf_counter() - started)


def main():
    devices = args.devices or ["cpu"] + (["gpu"] if torch.cuda.is_available() else [])
    print(f"torch threads {torch.get_num_threads()}, DALI threads {args.threads}, batch {args.batch_size} per rank, "
          f"CPU cores {os.cpu_count()}, GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        quiet = dict(out_dir=scratch / "index", log=lambda message: None)
        inputs = {}
        for size in args.sizes:
            if size <= 64:
                inputs[size] = ("MNIST-5k train, 32x32", build_index(builtin_dataset() / "train", **quiet))
            else:
                if not (scratch / "photos").exists():
                    (scratch / "photos").mkdir()
                    write_photos(scratch / "photos", args.photos)
                inputs[size] = (f"synthetic {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEG",
                                build_index(scratch / "photos", **quiet))
        print("| output | input | device | images/s per rank (2 views each) | images per CPU second |")
        print("|---|---|---|---|---|")
        for size, (description, index) in inputs.items():
            for device in devices:
                rate, cpu_rate = images_per_second(index, size, device)
                print(f"| {size}px | {description} | {device} | {rate:,.0f} | {cpu_rate:,.0f} |", flush=True)
        if args.index_files:
            (scratch / "tree").mkdir()
            rate = index_files_per_second(scratch / "tree", args.index_files)
            print(f"\nbuild_index: {args.index_files:,} files in 100 class folders at {rate:,.0f} files/s "
                  f"-> 1,281,167 ImageNet files in ~{1_281_167 / rate:.0f} s")


if __name__ == "__main__":
    main()
