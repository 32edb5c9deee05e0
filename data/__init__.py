"""Input data: stable instance ids for a folder of images, DALI pipelines sharded per Horovod rank, MNIST-5k.

The interface the trainer uses (details in each module's docstring):

data.builtin.builtin_dataset(cache_dir=None) -> Path
    Root with `train/` and `val/` ImageFolder trees of MNIST-5k as 32x32 RGB JPEGs (4000/1000, stratified),
    written once under `$XDG_CACHE_HOME or ~/.cache` / instance-classifier / mnist5k-32px-v1. Safe to call
    from all ranks at once.

data.index.build_index(folder, *, out_dir=None, strict=False, log=print) -> InstanceIndex
    Scan `folder` (class sub-folders, or a flat folder of images), exclude and report bad files (`strict`:
    raise instead), sort, save under `<out_dir or cache>/index-<name>-<hash>/` and return the index:
    `.root`, `.files` (sorted relative paths; position = instance id), `.labels` ([N] int64 class, -1 for a
    flat folder), `.class_names`, `.num_instances`, `.num_excluded`, `.file_list` (DALI "relative/path id"),
    `.path` (its index.json). `InstanceIndex.load(path)` reloads it for a resume; `index.save(dir)` writes a copy.

data.pipelines.pretrain_loader(index, *, batch_size, image_size, views=2, rank=0, world_size=1, device="auto",
                               threads=2, seed=0, min_scale=0.2)
    Each `for` is one epoch of (views, ids): `views` is a list of `views` float32 [b, 3, S, S] tensors
    (MoCo v2 augmentations, ImageNet-normalized), ids an int64 [b] of instance ids; across ranks every
    instance comes exactly once per epoch; b < batch_size only in the last batch. `len(loader)` is the number
    of batches per epoch on this rank. CUDA tensors on the GPU path, CPU tensors otherwise.
data.pipelines.eval_loader(index, *, batch_size, image_size, rank=0, world_size=1, device="auto", threads=2,
                           crop_ratio=0.875)
    Each `for` is one pass of (images float32 [b, 3, S, S], ids int64 [b]): shorter side resized to
    round(S / crop_ratio), center crop S; no randomness; every instance once across ranks, in id order per rank.
data.pipelines.linear_train_loader(index, *, batch_size, image_size, rank=0, world_size=1, device="auto",
                                   threads=2, seed=0)
    As pretrain_loader with one view of random resized crop (area 0.08-1) + flip, yielding (images, ids).

Bad images. Empty, unreadable, non-JPEG/PNG and truncated files (no end marker) are found by reading a few
bytes at index time and left out. Damage those checks cannot see reaches DALI's decoder (measured on the CPU
decoder, DALI 2.4; the GPU decoder was not available to test):
- a JPEG whose entropy-coded data is cut or garbled but which still ends in an end-of-image marker decodes,
  with a "Corrupt JPEG data" warning on stderr and grey or garbled rows: training goes on with that image;
- a file DALI cannot decode at all stops its pipeline: the loader raises ValueError("DALI cannot decode
  <file> in <root> ..."), naming the file when DALI does, and never hangs. In a Horovod job that rank exits
  with the error and horovodrun then stops the other ranks (tests/test_data_pipelines.py checks this at P=2).
"""
