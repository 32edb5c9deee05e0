"""--precision: auto is the fastest on the device (bf16 on GPUs of compute capability 8.0 and newer, fp32 on
older GPUs and the CPU), checked on CPU by stubbing the CUDA queries; bf16 on a GPU without bf16 tensor cores is
a one-line error; the resolved value is the run's config, and the encoder and the classifier compute at it."""
import argparse
import json
import re

import pytest
import torch

import trainer
from model.precision import autocast, compute_dtype, fastest_precision
from run.errors import UsageError
from settings import check_machine_and_paths, machine_precision


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA machine whose GPUs have the compute capability the test sets: gpu(major, minor, name)."""
    def install(major, minor, name="Test GPU"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return install


@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((8, 6), "bf16"),
                                                  ((7, 5), "fp32"), ((7, 0), "fp32"), ((6, 0), "fp32")])
def test_auto_is_bf16_on_gpus_with_bf16_tensor_cores_and_fp32_on_older_ones(gpu, capability, expected):
    gpu(*capability)
    assert machine_precision("auto") == expected
    assert fastest_precision(torch.device("cuda", 0)) == expected  # the default of embed and the classifier


def test_auto_is_fp32_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert machine_precision("auto") == "fp32" and fastest_precision(torch.device("cpu")) == "fp32"
    assert machine_precision("bf16") == "bf16"  # CPU autocast has bf16: asked for, it is honoured


def test_bf16_on_a_gpu_without_bf16_tensor_cores_is_one_line_naming_it(gpu, tmp_path):
    gpu(7, 0, "Tesla V100-SXM2-16GB")
    config = trainer.resolve_config(trainer.parser.parse_args(["--out", str(tmp_path), "--precision", "bf16",
                                                               "--kernel-backend", "chunked"]))
    with pytest.raises(UsageError, match=re.escape(
            "--precision bf16: Tesla V100-SXM2-16GB (compute capability 7.0) has no bf16 tensor cores")):
        check_machine_and_paths(config)
    assert machine_precision("fp32") == "fp32"


def test_the_resolved_precision_is_the_runs_config(gpu, tmp_path):
    gpu(8, 0)
    config = trainer.resolve_config(trainer.parser.parse_args(["--out", str(tmp_path), "--kernel-backend",
                                                               "chunked"]))
    assert config.precision == "auto"
    check_machine_and_paths(config)
    assert config.precision == "bf16"


@pytest.mark.parametrize("precision, expected", [("bf16", torch.bfloat16), ("fp32", torch.float32),
                                                 (None, torch.float32), ("auto", torch.float32)])
def test_the_encoder_computes_at_the_precision_it_is_given(precision, expected):
    from model.encoder import build_encoder, embed
    config = argparse.Namespace(arch="resnet18", small_stem=True, width=8, hidden_dim=16, feat_dim=8)
    backbone, head = build_encoder(config, torch.device("cpu"))
    assert embed(backbone, head, torch.randn(2, 3, 16, 16), precision).dtype == expected
    assert compute_dtype(precision, torch.device("cpu")) == expected


def test_fp32_is_no_autocast_at_all():
    """Not even a disabled one: an autocast context needs a device type that has autocast."""
    with autocast("fp32", torch.device("meta")):
        assert torch.nn.Linear(3, 3)(torch.ones(2, 3)).dtype == torch.float32


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.slow
def test_a_run_trains_its_encoder_and_classifier_at_its_precision(precision, tmp_path, monkeypatch, single_engine):
    """A short synthetic run in this process: the features reaching the classifier come from the encoder's autocast,
    and the classifier's kernels round their operands to the same dtype."""
    from model.classifier import ShardedInstanceClassifier
    seen = []
    forward = ShardedInstanceClassifier.forward

    def recording_forward(classifier, features, ids):
        seen.append((features.dtype, classifier.compute_dtype))
        return forward(classifier, features, ids)
    monkeypatch.setattr(ShardedInstanceClassifier, "forward", recording_forward)
    out = tmp_path / "run"
    config = trainer.resolve_config(trainer.parser.parse_args([
        "--data", "synthetic", "--instances", "16", "--epochs", "1", "--steps-per-epoch", "2", "--out", str(out),
        "--arch", "resnet18", "--width", "8", "--small-stem", "--image-size", "16", "--hidden-dim", "16",
        "--feat-dim", "8", "--batch-size", "4", "--precision", precision, "--no-raw-init", "--engine", "single"]))
    check_machine_and_paths(config)
    trainer.pretrain(config)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    assert seen == [(dtype, dtype)] * 2
    assert json.loads((out / "config.json").read_text())["precision"] == precision
