"""train-cnn's options: declared once (TrainConfig's fields), offered by the CLI, checked, documented in README.md."""

import dataclasses
from pathlib import Path

import pytest
import typer

from featurepipe.cli import app
from featurepipe.errors import FeaturepipeError
from featurepipe.docs_table import option_rows, readme_rows
from featurepipe.options import TrainConfig, declared, flag

README = Path(__file__).resolve().parents[1] / "README.md"


def _command(name: str):
    return typer.main.get_command(app).commands[name]


def test_readme_table_lists_every_option_of_train_cnn_with_its_default():
    cli = {name: (default, help) for name, default, help in option_rows(_command("train-cnn"))}
    readme = {name: (default, help) for name, default, help in readme_rows(README.read_text(encoding="utf-8"))}
    problems = ([f"{n}: in train-cnn --help, not in README.md's table" for n in cli.keys() - readme.keys()]
                + [f"{n}: in README.md's table, not an option of train-cnn" for n in readme.keys() - cli.keys()]
                + [f"{n}: README.md says {readme[n]}, the CLI {cli[n]}" for n in cli.keys() & readme.keys()
                   if cli[n] != readme[n]])
    assert not problems, "\n".join(problems + ["rewrite the table: python -m featurepipe.docs_table README.md"])


def test_help_shows_every_option_of_the_table():
    shown = typer.testing.CliRunner().invoke(app, ["train-cnn", "--help"], terminal_width=300).output
    for name, _, _ in readme_rows(README.read_text(encoding="utf-8")):
        assert name.split(" / ")[0] in shown


def test_train_cnn_and_lr_find_take_the_declared_options():
    """Every option but --data and --out is a TrainConfig field (so it is validated and saved in
    config.json), with the declared default and help in both commands."""
    fields = {flag(f.name): f for f in declared(TrainConfig)}
    for command, own in (("train-cnn", {"--data", "--out"}), ("lr-find", {"--data", "--out", "--steps"})):
        for p in _command(command).params:
            if p.name == "help" or p.opts[0] in own:
                continue
            assert p.opts[0] in fields, f"{command} {p.opts[0]}: declare it as a field of TrainConfig"
            f = fields[p.opts[0]]
            assert (p.default, p.help) == (f.default, f.metadata["help"]), (command, p.opts[0])
    assert {p.opts[0] for p in _command("train-cnn").params} >= set(fields)


def test_arch_help_lists_the_registry():
    from featurepipe.models.registry import arch_names

    help = {f.name: f for f in declared(TrainConfig)}["arch"].metadata["help"]
    assert help.split("one of: ", 1)[1].rstrip(".").split(", ") == arch_names()


def test_defaults_pass_their_own_checks():
    TrainConfig().validate()
    for f in declared(TrainConfig):
        check = f.metadata["check"]
        assert check is None or check.problem(f.default) is None, f.name


@pytest.mark.parametrize("changes, message", [
    ({"epochs": 0}, "--epochs 0: must be at least 1"),
    ({"batch_size": 0}, "--batch-size 0: must be at least 1"),
    ({"img_size": 0}, "--img-size 0: must be at least 1"),
    ({"patience": 0}, "--patience 0: must be at least 1"),
    ({"folds": 0}, "--folds 0: must be at least 1"),
    ({"freeze_epochs": -1}, "--freeze-epochs -1: must be 0 or more"),
    ({"lr": float("nan")}, "--lr nan: must be a positive number"),
    ({"weight_decay": float("inf")}, "--weight-decay inf: must be 0 or a positive number"),
    ({"seed": 2**32}, "--seed 4294967296: must be in 0..4294967295"),
    ({"lr_backbone_ratio": 0.0}, "--lr-backbone-ratio 0.0: must be in (0, 1]"),
    ({"label_smoothing": 1.0}, "--label-smoothing 1.0: must be in [0, 1)"),
    ({"sampler": "x"}, "--sampler x: choose one of shuffle, balanced"),
    ({"monitor": "f1"}, "--monitor f1: choose one of none, loss, macro_f1"),
    ({"augment": "heavy"}, "--augment heavy: choose one of auto, none, light, xray, rgb"),
    ({"arch": "alexnet9"}, "--arch alexnet9: choose one of auto, sixblock"),
    ({"on_bad_image": "ignore"}, "--on-bad-image ignore: choose skip or error"),
    ({"weights": "imagenet"}, "--weights imagenet: name the architecture they belong to with --arch"),
    ({"arch": "convnext_tiny", "img_size": 30}, "--img-size 30: too small; convnext_tiny needs at least 32 px"),
])
def test_each_constraint_names_the_option_in_one_line(changes, message):
    with pytest.raises(FeaturepipeError) as e:
        dataclasses.replace(TrainConfig(), **changes).validate()
    assert message in str(e.value) and "\n" not in str(e.value)
