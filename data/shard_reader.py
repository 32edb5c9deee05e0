"""DALI's webdataset reader over a shard index (data/shards.py), each sample's instance id read back from the
metadata the reader attaches to its image.

Reading. `fn.readers.webdataset` reads the index's shards through its DALI index files, so it sees only the
samples the index kept, each as one component (the image) whatever the format. The reader lays the samples of
its shards end to end, in the order of `paths`, and gives rank r the contiguous run [N r / P, N (r + 1) / P) of
that sequence, padded (pad_last_batch) to the longest rank's number of batches, as fn.readers.file does with a
file list: with the loader's PARTIAL policy (data/pipelines.py) every sample comes exactly once per epoch across
the ranks. Training, and the shuffled evaluation pass, use `shuffle_after_epoch`: the reader permutes the order of
the shards, already for the first epoch and again after each, from `shuffle_after_epoch_seed`, which all ranks
share so that they cut the same sequence; and `random_shuffle` draws each rank's samples from a buffer of
SHUFFLE_BUFFER samples read ahead, seeded by the pipeline's seed. An epoch's order is therefore a function of
(seed, epoch) as for folders. The buffer only mixes samples read near one another: shards that each hold one class
would still make batches of one or two classes, which is why `trainer.py pack` deals the samples out in a seeded
random order across shards (data/pack.py). Evaluation without a shuffle seed reads the shards in index order,
each rank its own run (stick_to_shard), no buffer: id order, as for folders.

Ids. DALI's source info for a webdataset sample is "<shard path>:<offset>:<component file name>", and the
index files give each image the instance id, zero-padded to ID_DIGITS, as its file name. So the pipeline takes
the last ID_DIGITS bytes of the image's source info and computes sum_j (byte_j - '0') 10^(ID_DIGITS - 1 - j) in
int64: the id comes out of the reader with its image, whatever order the shuffles chose.
"""
import re

import numpy as np
from nvidia.dali import fn, types

from data.shards import ID_DIGITS, IMAGE_COMPONENT

SHUFFLE_BUFFER = 1024  # encoded samples held per rank (DALI's default)
SOURCE_ID = re.compile(rf":(\d{{{ID_DIGITS}}})$")  # the id at the end of a sample's source info


def read_shards(index, rank, world_size, shuffle_seed, name):
    """(encoded images, ids [1] int64) of this rank's share of the index, shuffled unless shuffle_seed is None."""
    if shuffle_seed is None:
        order = dict(stick_to_shard=True)
    else:
        order = dict(shuffle_after_epoch=True, shuffle_after_epoch_seed=shuffle_seed, random_shuffle=True,
                     initial_fill=SHUFFLE_BUFFER)
    paths, index_paths = index.dali_files()
    encoded = fn.readers.webdataset(paths=paths, index_paths=index_paths, ext=[IMAGE_COMPONENT], shard_id=rank,
                                    num_shards=world_size, pad_last_batch=True, name=name, **order)
    return encoded, instance_ids(encoded)


def instance_ids(encoded):
    """The instance id of each sample, from the last ID_DIGITS characters of its source info -> [1] int64."""
    source = fn.get_property(encoded, key="source_info")  # uint8 text, one per sample
    digits = fn.cast(source[-ID_DIGITS:], dtype=types.INT64) - ord("0")  # [ID_DIGITS]
    place_values = types.Constant(10 ** np.arange(ID_DIGITS - 1, -1, -1, dtype=np.int64), dtype=types.INT64)
    return fn.reshape(fn.reductions.sum(digits * place_values, axes=0), shape=[1])


def source_name(index, source):
    """'<shard>/<key> (instance i)' for the source info DALI names a sample by, else the source info itself."""
    match = SOURCE_ID.search(source)
    if match is None or int(match.group(1)) >= index.num_instances:
        return source
    instance = int(match.group(1))
    return f"{index.name(instance)} (instance {instance})"
