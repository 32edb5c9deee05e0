"""Input data: an image folder or WebDataset tar shards -> stable instance ids -> DALI pipelines sharded over
the ranks.

`data.loaders` holds the loaders (`pretrain_loader`, `linear_train_loader`, `eval_loader`), each built from a
run's config (DALI imported only to build a DALI one; `--data synthetic` takes `data.synthetic`'s random images).
The path of every image folder, the built-in one included, and of every folder of shards, and where each step is
documented:
- `data.builtin`: the built-in MNIST-5k, written once as a 32x32 JPEG ImageFolder tree (`builtin_dataset`), and
  its variant with near-duplicates (`twins_dataset`, the trainer's --twins);
- `data.index`: the instance index of a folder (`build_index`, `InstanceIndex.load`): sorted paths, id =
  position, bad files left out at index time;
- `data.shards`: the instance index of tar shards (`build_shard_index`, `ShardIndex.load`): sorted shards and
  member order, id = position, bad samples and damaged shards left out, DALI's index files in the run;
- `data.formats`: the image formats DALI decodes, by header, and whether an image is complete;
- `data.run_index`: a run's indexes, built once by rank 0 in the run directory (`run_indexes`, `load_index`);
- `data.pack`: `trainer.py pack`, an image folder written as shards in a seeded random order;
- `data.shard_reader`: DALI's webdataset reader over a shard index, ids read back from each image's metadata;
- `data.pipelines`: the loaders' DALI pipelines and `InstanceLoader`: sharding, seeds, devices, lifetime, memory,
  and what happens to damaged images that reach the decoder;
- `data.augment`: the per-image transforms (MoCo v2 views, evaluation crops);
- `data.decoder`: the decoder's device and the GPU decoder's memory, sized from the data.
Where derived files live, and how every rank writes one atomically: `run.files`.
"""
