"""A pretraining run's settings: the defaults of the flags left unset (`resolve_config`), judged before any data is
touched; the first impossible value or combination is one UsageError naming the flags. `check_settings` needs
nothing but the flags (`plan` uses it too); `check_machine_and_paths` also looks at this machine (CUDA, the GPU's
precisions) and at the paths given, and resolves `--precision auto` for this machine; `check_fits_data` judges
what only the data's size decides, in `complete_config`, which adds what a run derives from its data and ranks;
`check_saved_flags` gives settings read back from a checkpoint the types and choices that parsing gives the flags.
It sits beside trainer.py, above data/, model/ and run/, because it judges the flags of all of them.
"""
import importlib.metadata
import os
from pathlib import Path

import torch

from data.loaders import is_synthetic
from kernels.reference import check_options
from model.precision import fastest_precision, has_bf16_tensor_cores
from run.checkpoint import resolve_checkpoint
from run.errors import UsageError

POSITIVE = ["image_size", "width", "feat_dim", "hidden_dim", "epochs", "batch_size", "threads", "save_every",
            "log_every"]
LOSS_FLAGS = {"temperature": "--temperature", "k": "--smooth-k", "alpha": "--smooth-alpha"}  # kernels.reference's names
SYNTHETIC_ONLY = ("instances", "steps_per_epoch")  # the flags of --data synthetic, ignored with image files

# Flags left unset take the built-in demo's values without --data, the ImageNet-scale ones with it.
# The built-in ones were chosen from measured runs on the digits (bench/RESULTS.md, "Built-in defaults"); the
# dataset ones are the paper's (tau, K, alpha) and MoCo's (lr, batch, augmentation).
BUILTIN_DEFAULTS = dict(image_size=32, arch="resnet18", width=16, small_stem=True, hidden_dim=512, epochs=12,
                        batch_size=32, warmup_epochs=1, classifier_lr_mult=10.0, lr=0.24, min_scale=0.5,
                        crop_ratio=1.0, flip=False, temperature=0.1, smooth_k=10, smooth_alpha=0.1)
DATASET_DEFAULTS = dict(image_size=224, arch="resnet50", width=64, small_stem=False, hidden_dim=2048, epochs=200,
                        batch_size=64, warmup_epochs=10, classifier_lr_mult=1.0, lr=0.03, min_scale=0.2,
                        crop_ratio=0.875, flip=True, temperature=0.15, smooth_k=5, smooth_alpha=0.2)
# --data synthetic measures the step: its runs are a few hundred steps, where a 10-epoch warm-up cannot fit.
SYNTHETIC_DEFAULTS = {**DATASET_DEFAULTS, "warmup_epochs": 0}


def flag(name):
    return "--" + name.replace("_", "-")


def resolve_config(args, defaults=None):
    """The flags with the unset ones filled in (BUILTIN_DEFAULTS without --data, SYNTHETIC_DEFAULTS with --data
    synthetic, else DATASET_DEFAULTS),
    judged before anything else runs: a UsageError names the first bad one."""
    defaults = defaults or (BUILTIN_DEFAULTS if args.data is None else
                            SYNTHETIC_DEFAULTS if is_synthetic(args) else DATASET_DEFAULTS)
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    check_settings(args)
    return args


def check_settings(config):
    """Ranges of single flags and the combinations that cannot train (--views is limited by its choices)."""
    for name in POSITIVE:
        require(getattr(config, name) > 0, f"{flag(name)} must be positive, got {getattr(config, name)}")
    require(config.instances >= 2, f"--instances must be at least 2, got {config.instances}")
    require(config.steps_per_epoch is None or (is_synthetic(config) and config.steps_per_epoch > 0),
            "--steps-per-epoch takes a positive number of steps, with --data synthetic only")
    require(0 <= config.twins <= 1, f"--twins is a fraction of the train images in [0, 1], got {config.twins}")
    require(not config.twins or config.data is None, "--twins makes near-duplicates of the built-in data: it takes "
            "no --data")
    require(config.knn_every >= 0, f"--knn-every must be >= 0, got {config.knn_every}")
    require(config.keep_checkpoints >= 0, f"--keep-checkpoints must be >= 0 (0 keeps every one), got "
            f"{config.keep_checkpoints}")
    require(config.seed >= 0, f"--seed must be >= 0 (it seeds DALI), got {config.seed}")
    try:
        check_options(LOSS_FLAGS, temperature=config.temperature, k=config.smooth_k, alpha=config.smooth_alpha)
    except ValueError as error:
        raise UsageError(str(error)) from None
    require(config.lr > 0, f"--lr must be > 0, got {config.lr}")
    require(config.classifier_lr_mult > 0, f"--classifier-lr-mult must be > 0, got {config.classifier_lr_mult}")
    require(0 <= config.momentum < 1, f"--momentum must be in [0, 1), got {config.momentum}")
    require(config.weight_decay >= 0, f"--weight-decay must be >= 0, got {config.weight_decay}")
    require(0 < config.min_scale <= 1, f"--min-scale is an area fraction in (0, 1], got {config.min_scale}")
    require(0 < config.crop_ratio <= 1, f"crop_ratio is the evaluation crop's side over the resized image's, in "
            f"(0, 1], got {config.crop_ratio}")  # no flag sets it: a saved config's (the defaults' otherwise)
    require(0 <= config.warmup_epochs < config.epochs, f"--warmup-epochs {config.warmup_epochs} must be in "
            f"[0, --epochs {config.epochs}): the learning rate would never reach its cosine decay")


def check_fits_data(config, num_instances):
    """What the flags must fit once the number of instances (classifier rows) is known: the K hardest classes
    are some of an image's other num_instances - 1 classes."""
    require(config.smooth_k < num_instances, f"--smooth-k {config.smooth_k}: the K hardest classes are among an "
            f"image's {num_instances - 1:,} other instances here, so K must be below {num_instances:,}")


def complete_config(config, num_instances, world_size):
    """config := the resolved flags and what the run derives from its data and its ranks (saved as config.json
    and in every checkpoint), once the data has passed check_fits_data (the same on every rank)."""
    check_fits_data(config, num_instances)
    config.num_instances, config.world_size = num_instances, world_size
    config.global_batch = config.batch_size * world_size
    config.base_lr = config.lr * config.global_batch / 256
    config.versions = package_versions()


def package_versions():  # None for a package that is not installed
    return {name: next((found.version for found in importlib.metadata.distributions(name=name)), None)
            for name in ("torch", "horovod", "nvidia-dali-cuda120", "triton", "numpy")}


def check_machine_and_paths(config):
    """What pretraining needs from this machine and from the paths it is given; config.precision := the one it
    will run at (auto: the fastest on this machine's GPUs, or the CPU)."""
    cuda = torch.cuda.is_available()
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests)
    check_dali_device(config.dali_device)
    config.precision = machine_precision(config.precision)
    require(cuda or interpreted or config.kernel_backend != "triton", "--kernel-backend triton needs CUDA (or "
            "TRITON_INTERPRET=1, Triton's slow CPU interpreter), and torch sees no CUDA device")
    if config.kernel_backend == "triton" or (config.kernel_backend == "auto" and cuda):
        from kernels.triton_topk_xent import MAX_FEATURE_DIM, MAX_K  # imports Triton: only when it will run
        require(config.smooth_k <= MAX_K, f"--smooth-k {config.smooth_k}: the Triton kernels take K <= {MAX_K} "
                f"(--kernel-backend chunked has no limit)")
        require(config.feat_dim <= MAX_FEATURE_DIM, f"--feat-dim {config.feat_dim}: the Triton kernels take "
                f"D <= {MAX_FEATURE_DIM} (--kernel-backend chunked has no limit)")
    if config.data is not None and not is_synthetic(config):
        require(Path(config.data).expanduser().is_dir(), f"--data {config.data}: no such folder")
    require(not Path(config.out).exists() or Path(config.out).is_dir(), f"--out {config.out} is not a folder")
    if config.resume not in ("auto", "none"):
        resolve_checkpoint(config.resume)  # its one-line error when there is none


def check_dali_device(dali_device, from_run=False):
    """A DALI device this machine has; from_run: the run's, which an evaluation takes without --dali-device."""
    require(dali_device != "gpu" or torch.cuda.is_available(), ("the run's " if from_run else "") + "--dali-device "
            "gpu needs CUDA, and torch sees no CUDA device" + (": pass --dali-device cpu" if from_run else ""))
    return dali_device


def machine_precision(precision):
    """--precision on this machine (the GPUs of a node are taken to be of one kind: the first visible one's, else
    the CPU): auto = the fastest there; bf16 on a GPU without bf16 tensor cores is refused (emulated: slower than
    fp32)."""
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if precision == "auto":
        return fastest_precision(device)
    if precision == "bf16" and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        require(has_bf16_tensor_cores(device), f"--precision bf16: {torch.cuda.get_device_name(device)} (compute "
                f"capability {major}.{minor}) has no bf16 tensor cores (8.0 and newer have): use --precision fp32")
    return precision


def require(condition, message):
    if not condition:
        raise UsageError(message)


KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def check_saved_flags(parser, saved, defaults):
    """Settings read back (a checkpoint's config), which no command line parsed: each flag's value of the type its
    flag parses to (a bool for a switch, None where the flag defaults to None) and among its choices, and each
    setting that no flag sets but `defaults` does of its default's type. A UsageError names the first that is not;
    check_settings judges their ranges then."""
    kinds = {name: type(value) for name, value in defaults.items()}
    options = {}
    for action in parser._actions:
        if action.option_strings and action.dest in saved:
            kinds[action.dest] = bool if action.nargs == 0 else action.type or str
            options[action.dest] = action
    for name, kind in kinds.items():
        if name not in saved:
            continue
        value, action = saved[name], options.get(name)
        label = name if action is None else flag(name)
        accepted = (int, float) if kind is float else (kind,)
        if action is not None and action.default is None:
            accepted += (type(None),)
        if not isinstance(value, accepted) or (isinstance(value, bool) and kind is not bool):
            raise UsageError(f"{label} {value!r:.60}: not {KIND_NAMES.get(kind, kind.__name__)}")
        if action is not None and action.choices is not None and value is not None and value not in action.choices:
            raise UsageError(f"{label} {value!r:.60}: not one of {', '.join(map(str, action.choices))}")
