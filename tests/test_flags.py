"""The built-in and dataset defaults of --flip and --blur, resolved by trainer.resolve_config
and passed on by data.loaders to the DALI loaders (whose flip itself tests/test_data_pipelines.py checks)."""
import types

import pytest

import trainer
from data import loaders


@pytest.mark.parametrize("argv, flip", [([], False), (["--flip"], True), (["--data", "/some/folder"], True),
                                        (["--data", "/some/folder", "--no-flip"], False)])
def test_flip_defaults_off_for_the_builtin_digits_and_on_for_folders(argv, flip):
    assert trainer.resolve_config(trainer.parser.parse_args(argv)).flip is flip


@pytest.mark.parametrize("flip", [False, True])
def test_loaders_pass_the_runs_flip_to_both_training_loaders(flip, monkeypatch, single_engine):
    calls = {}
    fake = types.SimpleNamespace(**{name: (lambda name: lambda index, **kwargs: calls.setdefault(name, kwargs))(name)
                                    for name in ("pretrain_loader", "linear_train_loader")})
    monkeypatch.setattr(loaders, "pipelines", lambda: fake)
    config = trainer.resolve_config(trainer.parser.parse_args(["--flip" if flip else "--no-flip"]))
    loaders.pretrain_loader(None, config, epoch=0)
    loaders.linear_train_loader(None, config, epoch=0, batch_size=8)
    assert calls["pretrain_loader"]["flip"] is flip and calls["linear_train_loader"]["flip"] is flip


@pytest.mark.parametrize("argv, blur", [([], True), (["--no-blur"], False), (["--data", "/some/folder"], True)])
def test_the_runs_blur_reaches_the_pretraining_loader(argv, blur, monkeypatch, single_engine):
    calls = {}
    fake = types.SimpleNamespace(pretrain_loader=lambda index, **kwargs: calls.update(kwargs))
    monkeypatch.setattr(loaders, "pipelines", lambda: fake)
    loaders.pretrain_loader(None, trainer.resolve_config(trainer.parser.parse_args(argv)), epoch=0)
    assert calls["blur"] is blur


@pytest.fixture
def evaluation_of_a_gpu_run(monkeypatch, tmp_path):
    """trainer.evaluation_setup around a checkpoint whose run decoded with --dali-device gpu (the loading stubbed,
    the rest real), on this machine's CUDA or none."""
    import torch
    monkeypatch.setattr(trainer, "resolve_checkpoint", lambda ckpt: tmp_path / "checkpoint-0001")
    monkeypatch.setattr(trainer, "start", lambda engine: types.SimpleNamespace(device=torch.device("cpu")))
    monkeypatch.setattr(trainer, "load_trained_backbone", lambda checkpoint: (
        torch.nn.Identity(), types.SimpleNamespace(dali_device="gpu")))
    monkeypatch.setattr(trainer, "saved_run_indexes", lambda run: (None, None))
    return lambda name, *flags: trainer.evaluation_setup(trainer.evaluation_parser(name, "").parse_args(
        ["--ckpt", "run", *flags]))[3]


@pytest.mark.parametrize("name", ["knn", "linear"])
def test_knn_and_linear_take_dali_device_over_the_runs(name, evaluation_of_a_gpu_run, monkeypatch):
    """A run decoded on its GPUs, its evaluation on a machine without one (or with DALI on the CPU)."""
    import torch
    assert evaluation_of_a_gpu_run(name, "--dali-device", "cpu").dali_device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(trainer.UsageError, match=r"^the run's --dali-device gpu needs CUDA, and torch sees no CUDA "
                                                 r"device: pass --dali-device cpu$"):
        evaluation_of_a_gpu_run(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert evaluation_of_a_gpu_run(name).dali_device == "gpu"


def test_the_subcommands_that_read_images_take_dali_device():
    for command in (trainer.knn_command, trainer.linear, trainer.export):
        with pytest.raises(SystemExit):
            command(["--help"])
    for name in ("knn", "linear"):
        assert trainer.evaluation_parser(name, "").parse_args(["--ckpt", "x", "--dali-device", "cpu"]).dali_device \
            == "cpu"
    with pytest.raises(SystemExit):
        trainer.evaluation_parser("export", "", reads_images=False).parse_args(["--ckpt", "x", "--dali-device", "cpu"])
