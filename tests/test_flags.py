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
