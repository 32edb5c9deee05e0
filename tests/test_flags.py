"""The built-in and dataset defaults of --flip and --blur, resolved by trainer.resolve_config and passed on by
data.loaders to the DALI pipelines (whose flip itself tests/test_data_pipelines.py checks); the data settings judged
once, where they enter (settings.py: the command line, a saved config, this machine), not again by the loaders."""
import re
import types

import pytest

import trainer
from data import loaders
from run.errors import UsageError


@pytest.mark.parametrize("argv, flip", [([], False), (["--flip"], True), (["--data", "/some/folder"], True),
                                        (["--data", "/some/folder", "--no-flip"], False)])
def test_flip_defaults_off_for_the_builtin_digits_and_on_for_folders(argv, flip):
    assert trainer.resolve_config(trainer.parser.parse_args(argv)).flip is flip


@pytest.fixture
def pipeline_arguments(monkeypatch, single_engine):
    """{pipeline name: the arguments a loader of data.loaders gave DALI's InstanceLoader}, no pipeline built."""
    from data import pipelines
    calls = {}
    monkeypatch.setattr(pipelines, "InstanceLoader", lambda pipeline, names, index, **arguments: calls.setdefault(
        pipeline.__name__, arguments))
    return calls


@pytest.mark.parametrize("flip", [False, True])
def test_loaders_pass_the_runs_flip_to_both_training_loaders(flip, pipeline_arguments):
    config = trainer.resolve_config(trainer.parser.parse_args(["--flip" if flip else "--no-flip"]))
    loaders.pretrain_loader(None, config, epoch=0)
    loaders.linear_train_loader(None, config, epoch=0, batch_size=8)
    assert pipeline_arguments["pretrain_pipeline"]["flip"] is flip
    assert pipeline_arguments["linear_train_pipeline"]["flip"] is flip


@pytest.mark.parametrize("argv, blur", [([], True), (["--no-blur"], False), (["--data", "/some/folder"], True)])
def test_the_runs_blur_reaches_the_pretraining_loader(argv, blur, pipeline_arguments):
    loaders.pretrain_loader(None, trainer.resolve_config(trainer.parser.parse_args(argv)), epoch=0)
    assert pipeline_arguments["pretrain_pipeline"]["blur"] is blur


@pytest.mark.parametrize("flags, message", [
    (["--views", "3"], "argument --views: invalid choice: 3"),
    (["--dali-device", "tpu"], "argument --dali-device: invalid choice: 'tpu'"),
    (["--threads", "1.5"], "argument --threads: invalid int value: '1.5'"),
])
def test_the_parser_refuses_a_data_flag_outside_its_type_or_choices(flags, message, capsys):
    with pytest.raises(SystemExit):
        trainer.parser.parse_args(flags)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["--image-size", "0"], "--image-size must be positive, got 0"),
    (["--threads", "0"], "--threads must be positive, got 0"),
    (["--min-scale", "0"], "--min-scale is an area fraction in (0, 1], got 0.0"),
])
def test_a_data_flag_out_of_range_is_one_line_naming_it(flags, message):
    with pytest.raises(UsageError, match=f"^{re.escape(message)}$"):
        trainer.resolve_config(trainer.parser.parse_args(flags))


@pytest.mark.parametrize("changes, message", [
    ({"views": 3}, "--views 3: not one of 1, 2"),
    ({"dali_device": "tpu"}, "--dali-device 'tpu': not one of auto, cpu, gpu"),
    ({"threads": 1.5}, "--threads 1.5: not an integer"),
    ({"batch_size": 0}, "--batch-size must be positive, got 0"),
    ({"crop_ratio": 1.5}, "crop_ratio is the evaluation crop's side over the resized image's, in (0, 1], got 1.5"),
    ({"crop_ratio": 0.0}, "crop_ratio is the evaluation crop's side over the resized image's, in (0, 1], got 0.0"),
])
def test_the_data_settings_of_a_saved_config_are_judged_as_the_flags_are(changes, message):
    saved = {**vars(trainer.resolve_config(trainer.parser.parse_args([]))), **changes}
    with pytest.raises(UsageError, match=f"^state.pt holds a config that the flags refuse: {re.escape(message)}$"):
        trainer.saved_config(saved, "state.pt")


def test_dali_on_a_gpu_that_this_machine_lacks_is_one_line_before_any_work(monkeypatch, tmp_path):
    import torch

    from settings import check_machine_and_paths
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = trainer.resolve_config(trainer.parser.parse_args(["--dali-device", "gpu", "--out", str(tmp_path / "run")]))
    with pytest.raises(UsageError, match=r"^--dali-device gpu needs CUDA, and torch sees no CUDA device$"):
        check_machine_and_paths(config)


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
