"""DALI input pipelines over an instance index, sharded over the ranks; the label they yield is the instance id.
The DALI half of the loaders: data/loaders.py builds each kind from a run's config (and alone imports this
module, so that only a DALI loader needs DALI); here are the pipeline graphs and `InstanceLoader`, which runs one.

Reading. A folder's index (data/index.py) is read by `fn.readers.file`, a shard index (data/shards.py) by
`fn.readers.webdataset` (data/shard_reader.py, which reads each id back from the image's source info), both with
shard_id = rank, num_shards = world size and pad_last_batch=True under `DALIGenericIterator(last_batch_policy=
PARTIAL)`: padding gives every rank the same number of batches and the iterator strips the padded repeats, so
every instance comes exactly once per epoch over all ranks. Training loaders reshuffle the whole dataset each
epoch with a seed all ranks share, since they cut the same permutation into disjoint shards (`random_shuffle`
would only mix a 1024-image window of the class-sorted list); the shard reader shuffles the shards and a buffer
of samples instead. Evaluation loaders read their shard in id order, or shuffled (BatchNorm statistics need
batches that mix the classes).

Devices and seeds. "gpu" decodes with nvJPEG on the current CUDA device (`run.distributed.start()` makes it
current) and augments there; "cpu" runs without a driver; "auto" is "gpu" when torch sees CUDA; the decoder's
arguments come from data/decoder.py. Given an `output_device` (the rank's), a loader delivers
its batches there whichever device made them (`to_device`: no copy where they are already). The shuffle seed is
`seed` on every rank, the augmentation seed derives from (seed, rank). A new loader starts from its first
epoch's order: to resume at epoch e, pass a seed that depends on e.

Lifetime. A loader is iterable once per epoch and holds its pipeline until `close()`, the end of a `with` block or
its last reference; close it before building the next one, so that no two pipelines live at once. A dropped
loader also calls glibc's malloc_trim: DALI's threads allocate from per-thread arenas that glibc would otherwise
keep resident, and the trainer builds a loader per epoch.

Bad images that the index's checks cannot see reach DALI's decoder: a JPEG with garbled entropy-coded data still
decodes (a "Corrupt JPEG data" warning, garbled rows); a file DALI cannot decode at all raises UndecodableImage,
one line naming the file, and never hangs: that rank exits and its launcher stops the others.
"""
import contextlib
import ctypes
import ctypes.util
import re
import weakref

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import do_not_convert
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from data import augment
from data.decoder import decoder_arguments
from data.shard_reader import read_shards, source_name
from run.errors import UsageError

READER_NAME = "instances"
DECODE_FAILURE = re.compile(r"Failed to decode sample #\d+ : (.+)")
# glibc's malloc_trim(pad) returns free heap pages to the system; None where the C library has no such call.
MALLOC_TRIM = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)


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


@do_not_convert  # no per-sample `if`: autograph may leave it as it is (data/augment.py)
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
    """Batches of one DALI pipeline as torch tensors with int64 instance ids, on output_device (None: where DALI
    made them); each `for` over it is one epoch."""

    iterator = None  # so that close() works on a loader whose __init__ failed
    running_epoch = None  # weak reference to the generator of the epoch under way

    def __init__(self, pipeline_function, output_names, index, *, shuffle, group_views=False, batch_size, rank,
                 world_size, device, threads, seed, output_device=None, **pipeline_arguments):
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
        self.output_device = output_device
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
                images = [to_device(batch[name], self.output_device) for name in self.output_names]
                ids = to_device(batch["ids"].squeeze(1), self.output_device).long()  # [b, 1] int32 -> [b] int64
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


def to_device(tensor, device):
    """tensor on `device` (None: where it is), itself when it is there. From the CPU it goes through page-locked
    memory, non-blocking: copying pageable memory to a GPU goes through a page-locked buffer anyway (the driver
    stages it, and the host waits), so pinning it here costs no more copies, and the transfer then queues on the
    stream without making the host wait (torch keeps the pinned block until the copy is done)."""
    if device is None or tensor.device == device:
        return tensor
    if tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def resolve_device(device):
    """'cpu' or 'gpu' for a --dali-device of auto|cpu|gpu (settings.py has refused gpu where torch sees no CUDA)."""
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return device


def augmentation_seed(seed, rank):
    """A 31-bit DALI seed, different per rank, the same for the same (seed, rank)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]) & 0x7FFFFFFF
