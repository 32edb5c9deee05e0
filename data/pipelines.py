"""DALI input pipelines over an instance index, sharded per Horovod rank; the label they yield is the instance id.

Reading. The index of an image folder (data/index.py) is read by `fn.readers.file` over its file list with
shard_id = rank, num_shards = world size and pad_last_batch=True, consumed by
`DALIGenericIterator(reader_name=..., last_batch_policy=PARTIAL)`: padding gives every shard the same number of
batches and the iterator strips the padded repeats, so across all ranks every instance comes exactly once per
epoch, in a last batch smaller than batch_size where the shard does not divide (checked at P=2 over several
epochs by tests/test_data_pipelines.py). Training loaders reshuffle the whole dataset each epoch
(shuffle_after_epoch) with a seed that all ranks share, because they must agree on the permutation they cut
into disjoint shards; `random_shuffle` would only mix a 1024-image window of the class-sorted list, and each
rank would keep seeing a fixed subset of classes. Evaluation loaders read their shard in id order, or shuffled
the same way when given a shuffle_seed (BatchNorm statistics need batches that mix the classes). The index of tar shards (data/shards.py) is read by `fn.readers.webdataset` with the
same sharding, padding and shared shuffle seed, which shuffles the order of the shards and a buffer of samples
instead of the whole dataset; its ids are read back from each image's source info (data/shard_reader.py;
tests/test_data_shards.py checks every sample once per epoch at P=2 and 3).

Devices. "gpu" decodes with nvJPEG (`device="mixed"`) on the current CUDA device (call
`run.distributed.start()` first: it makes the local rank modulo the visible GPUs current) and augments
on the GPU; "cpu" decodes and augments on the CPU with `device_id=None`, which DALI runs without a driver.
"auto" is "gpu" when torch sees CUDA. The decoder's arguments, among them the GPU decoder's memory pools sized
from the data, come from data/decoder.py.

Seeds. The shuffle seed is `seed` itself, equal on all ranks; the augmentation seed is derived from
(seed, rank), so ranks draw different augmentations and a rerun with the same seed draws the same ones.
A new loader starts again from its first epoch's order: to resume at epoch e without replaying the shuffles
of epochs 0, 1, ..., pass a seed that depends on e.

A loader is iterable once per epoch: `for views, ids in loader` runs one epoch and the next `for` the next one.

Lifetime. A loader holds its pipeline (DALI's threads, the decoder's buffers, prefetched batches) until
`loader.close()`, the end of a `with loader:` block, or its last reference going away. Close it before the next
loader is built and before an evaluation pass, so that no two pipelines are alive at once: `loader = new(...)`
builds the new one while the old one still lives.

Bad images. Empty and unreadable files, and images that are not of a format DALI decodes or are cut short, are
left out at index time (data/formats.py). Damage those checks cannot see reaches DALI's decoder (measured on the
CPU decoder, DALI 2.4; the GPU decoder was not available to test):
- a JPEG whose entropy-coded data is cut or garbled but which still ends in an end-of-image marker decodes,
  with a "Corrupt JPEG data" warning on stderr and grey or garbled rows: training goes on with that image;
- a file DALI cannot decode at all stops its pipeline: the loader raises UndecodableImage (a ValueError that
  trainer.py reports in one line: "DALI cannot decode <file> in <root> ..."), naming the file when DALI does
  (a sample of shards as "<shard>/<key> (instance i)"), and never hangs. In a Horovod job that rank exits
  with the error and horovodrun then stops the other ranks (tests/test_data_pipelines.py checks this at P=2).

Memory. The trainer builds a new loader for every epoch (so that an epoch is a pure function of its seed), so a
dropped loader must give back what it took. DALI does free its buffers with the pipeline, but its worker threads
malloc'ed them from glibc's per-thread arenas, and glibc keeps freed arena memory resident: RSS grew ~18 MB per
pretraining loader, 322 -> 606 MiB over 16 loaders of the built-in set, with arenas of 140-270 MB holding under
2 MB in use (malloc_stats). So a dropped loader frees its pipeline at once and calls glibc's malloc_trim, which
returns the free pages inside the arenas: 316 -> 313 MiB over the same 16 loaders. It cannot return the free top
of a thread arena, so with ImageNet-sized images RSS still wanders by tens of MB, but without a trend.
"""
import contextlib
import ctypes
import ctypes.util
import re
import weakref

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from data import augment
from data.decoder import decoder_arguments
from data.shard_reader import read_shards, source_name
from run.errors import UsageError

READER_NAME = "instances"
DEVICES = ("auto", "cpu", "gpu")
DECODE_FAILURE = re.compile(r"Failed to decode sample #\d+ : (.+)")
# glibc's malloc_trim(pad) returns free heap pages to the system; None where the C library has no such call.
MALLOC_TRIM = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)


def pretrain_loader(index, *, batch_size, image_size, views=2, rank=0, world_size=1, device="auto", threads=2,
                    seed=0, min_scale=0.2, flip=True, blur=True):
    """Epochs of (views: `views` x [b, 3, S, S] float32, ids: [b] int64), shuffled, augmented for pretraining.

    The views of one image are independent augmentations of a single decode; `flip=False` never mirrors them and
    `blur=False` never blurs them.
    """
    if views not in (1, 2):
        raise ValueError(f"views must be 1 or 2, got {views!r}")
    if not 0 < min_scale <= 1:
        raise ValueError(f"min_scale must be in (0, 1], got {min_scale!r}")
    view_names = [f"view{number}" for number in range(views)]
    return InstanceLoader(
        pretrain_pipeline, view_names, index, shuffle=True, group_views=True, batch_size=batch_size, rank=rank,
        world_size=world_size, device=device, threads=threads, seed=seed, image_size=image_size, views=views,
        min_scale=min_scale, flip=flip, blur=blur)


def eval_loader(index, *, batch_size, image_size, rank=0, world_size=1, device="auto", threads=2, crop_ratio=0.875,
                shuffle_seed=None):
    """One pass of (images [b, 3, S, S] float32, ids [b] int64) per `for`: center crops, id order per rank, or
    with a shuffle_seed the whole dataset shuffled as for training (batches that mix the classes)."""
    check_crop_ratio(crop_ratio)
    return InstanceLoader(
        eval_pipeline, ["images"], index, shuffle=shuffle_seed is not None, batch_size=batch_size, rank=rank,
        world_size=world_size, device=device, threads=threads, seed=shuffle_seed or 0, image_size=image_size,
        crop_ratio=crop_ratio)


def linear_train_loader(index, *, batch_size, image_size, rank=0, world_size=1, device="auto", threads=2, seed=0,
                        flip=True):
    """Epochs of (images [b, 3, S, S] float32, ids [b] int64), shuffled, random-resized-crop + flip (if `flip`)."""
    return InstanceLoader(
        linear_train_pipeline, ["images"], index, shuffle=True, batch_size=batch_size, rank=rank, world_size=world_size,
        device=device, threads=threads, seed=seed, image_size=image_size, flip=flip)


@pipeline_def(enable_conditionals=True)
def pretrain_pipeline(index, rank, world_size, decoder, shuffle_seed, image_size, views, min_scale, flip, blur):
    images, ids = read_and_decode(index, rank, world_size, decoder, shuffle_seed)
    return (*[augment.pretrain_view(images, image_size, min_scale, flip, blur) for _ in range(views)], ids)


@pipeline_def
def linear_train_pipeline(index, rank, world_size, decoder, shuffle_seed, image_size, flip):
    images, ids = read_and_decode(index, rank, world_size, decoder, shuffle_seed)
    return augment.linear_train_view(images, image_size, flip), ids


@pipeline_def
def eval_pipeline(index, rank, world_size, decoder, shuffle_seed, image_size, crop_ratio):
    images, ids = read_and_decode(index, rank, world_size, decoder, shuffle_seed)
    return augment.center_view(images, image_size, crop_ratio), ids


def read_and_decode(index, rank, world_size, decoder, shuffle_seed):
    """This rank's shard as (decoded HWC uint8 RGB images, ids), reshuffled every epoch unless shuffle_seed is None;
    `decoder` holds the arguments of the image decoder (data/decoder.py)."""
    if index.layout == "shards":
        encoded, ids = read_shards(index, rank, world_size, shuffle_seed, name=READER_NAME)
    else:
        order = (dict(shuffle_after_epoch=True, shuffle_after_epoch_seed=shuffle_seed) if shuffle_seed is not None
                 else dict(stick_to_shard=True))
        encoded, ids = fn.readers.file(file_root=str(index.root), file_list=str(index.file_list), shard_id=rank,
                                       num_shards=world_size, pad_last_batch=True, name=READER_NAME, **order)
    images = fn.decoders.image(encoded, output_type=types.RGB, **decoder)
    # On the GPU path the ids leave the pipeline on the GPU too: as a CPU output of a GPU pipeline they may come in
    # pinned memory, whose DLPack capsule torch 2.13 rejects ("BufferError: Unsupported device_type: 3").
    return images, ids.gpu() if decoder["device"] == "mixed" else ids


class InstanceLoader:
    """Batches of one DALI pipeline as torch tensors with int64 instance ids; each `for` over it is one epoch."""

    iterator = None  # so that close() works on a loader whose __init__ failed
    running_epoch = None  # weak reference to the generator of the epoch under way

    def __init__(self, pipeline_function, output_names, index, *, shuffle, group_views=False, batch_size, rank,
                 world_size, device, threads, seed, **pipeline_arguments):
        check_positive(batch_size=batch_size, image_size=pipeline_arguments["image_size"], threads=threads)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        if index.path is None:
            raise ValueError("the instance index is not saved yet: save it (build_index does) first")
        device = resolve_device(device)
        decoder = decoder_arguments(index, device, training=shuffle)  # the shuffled loaders are the training ones
        pipeline = pipeline_function(
            index, rank, world_size, decoder, seed if shuffle else None, **pipeline_arguments,
            batch_size=batch_size, num_threads=threads, seed=augmentation_seed(seed, rank),
            device_id=torch.cuda.current_device() if device == "gpu" else None)
        self.index = index
        self.output_names = output_names
        self.group_views = group_views
        self.epoch_unfinished = False
        with decode_errors_explained(self.index):  # the iterator decodes its first batch while being built
            self.iterator = DALIGenericIterator(pipeline, [*output_names, "ids"], reader_name=READER_NAME,
                                                last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)

    def __len__(self):
        """Batches per epoch on this rank."""
        return len(self.iterator)

    def close(self):
        """Free the pipeline now: join DALI's threads and free its decoder and prefetched batches (batches already
        handed out stay valid). An unfinished epoch's `for` ends; iterating the loader again is an error.
        `del loader` does the same once no `for` over it is suspended; close() does not depend on references."""
        epoch = self.running_epoch and self.running_epoch()
        if epoch is not None:
            epoch.close()  # its frame holds the DALI iterator until it ends
        # The iterator holds the only other reference to the pipeline (no cycles): dropping it frees the pipeline
        # now, so that the trim below can return its pages (see Memory above).
        self.iterator = None
        return_free_heap_memory()

    __del__ = close

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.close()

    def __iter__(self):
        if self.iterator is None:
            raise ValueError("this loader was closed: build a new one")
        epoch = self.epoch()
        self.running_epoch = weakref.ref(epoch)  # not the generator itself: it references the loader
        return epoch

    def epoch(self):
        with decode_errors_explained(self.index):
            if self.epoch_unfinished:  # DALI cannot reset mid-epoch: finish it, so this epoch starts at its beginning
                for _ in self.iterator:
                    pass
            self.epoch_unfinished = True
            for (batch,) in self.iterator:  # one pipeline per rank
                images = [batch[name] for name in self.output_names]
                ids = batch["ids"].squeeze(1).to(images[0].device, torch.int64)  # [b, 1] int32 -> [b] int64
                yield (images if self.group_views else images[0]), ids
        self.epoch_unfinished = False


class UndecodableImage(UsageError, ValueError):
    """A file of the dataset that DALI cannot decode: the user's data, reported in one line by trainer.py."""


@contextlib.contextmanager
def decode_errors_explained(index):
    """Turn DALI's pipeline-killing decoder error into a one-line UndecodableImage naming the file (or the sample of
    a shard) where DALI names it."""
    try:
        yield
    except RuntimeError as error:
        if "decoders.image" not in str(error):
            raise
        named = DECODE_FAILURE.search(str(error))
        image = named.group(1).strip() if named else "an image (DALI does not say which)"
        if named and index.layout == "shards":
            image = source_name(index, image)
        raise UndecodableImage(f"DALI cannot decode {image} in {index.root} (truncated or corrupt): replace it, or "
                               f"remove it and index the folder again") from error


def return_free_heap_memory():
    """Give the pages of freed malloc memory in every glibc arena back to the system (a no-op without glibc)."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


def resolve_device(device):
    """'cpu' or 'gpu' for a device flag of auto|cpu|gpu."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu" and not torch.cuda.is_available():
        raise ValueError("device gpu was asked for, but torch sees no CUDA device")
    return device


def augmentation_seed(seed, rank):
    """A 31-bit DALI seed, different per rank, the same for the same (seed, rank)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]) & 0x7FFFFFFF


def check_positive(**values):
    for name, value in values.items():
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_crop_ratio(crop_ratio):
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio!r}")
