"""Each setting declared once: the recipes against the dataclass defaults, every setting reachable from a recipe and
from the train command with the same default, recipe errors as one line, the README's demo table against the demo
recipe, the Makefile passing only what the user set, and a run folder of the previous version resumed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest
import typer

from cli.main import app
from pipeline.config import (
    RECIPE_TABLES,
    RECIPES_DIR,
    SETTINGS,
    AlexNetConfig,
    TrainConfig,
    default_of,
    load_recipe,
    recipe_names,
    resolve_settings,
    user_settings,
)
from pipeline.errors import PipeError

REPO = Path(__file__).resolve().parents[1]


def train_command_params(*args: str) -> dict:
    """The train command's parsed options for ARGS, by the real Typer/click command (nothing runs)."""
    command = typer.main.get_command(app).commands["train"]
    required = ["--train", "t", "--val", "v", "--pca", "p", "--out", "o"]
    params = command.make_context("train", [*required, *args]).params
    return {k: v for k, v in params.items() if k not in ("train", "val", "pca", "out", "recipe", "devices", "force")}


def other_value(f, value):
    """A valid value of setting `f` other than `value`."""
    choices = f.metadata["choices"]
    if choices:
        return next(c for c in choices if c != value)
    if isinstance(value, bool):
        return not value
    if f.name == "dropout":
        return 0.25
    if f.name == "crop":
        return 227  # Caffe's: it fits the paper's short side
    return (value or 1) * 3 if isinstance(value, int | float) else value


def test_the_paper_recipe_is_the_dataclass_defaults_with_no_file_restating_them():
    assert not (RECIPES_DIR / "paper.toml").exists()
    assert resolve_settings("paper") == (AlexNetConfig(), TrainConfig())
    assert "paper" in recipe_names()


@pytest.mark.parametrize("f", [f for cls in SETTINGS.values() for f in user_settings(cls)], ids=lambda f: f.name)
def test_every_setting_is_reachable_from_a_recipe_and_the_command_line_with_the_same_default(f, tmp_path):
    section = next(s for s, cls in SETTINGS.items() if f in fields(cls))
    default = default_of(f)
    value = other_value(f, default if default is not None else 7)
    assert value != default
    # not given anywhere: the paper's default, from the command line's None and from the recipe
    params = train_command_params()
    assert params[f.name] is None
    assert getattr(resolve_settings("paper", params)[section == "train"], f.name) == default
    # from a recipe
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"[{section}]\n{f.name} = {json.dumps(value)}\n")
    assert getattr(resolve_settings(recipe)[section == "train"], f.name) == value
    # from the command line (its dashed name), over the recipe
    dashed = f"--{f.name.replace('_', '-')}"
    args = ([dashed] if value else [f"--no-{f.name.replace('_', '-')}"]) if isinstance(value, bool) \
        else [dashed, str(value)]
    params = train_command_params(*args)
    assert params[f.name] == value
    assert getattr(resolve_settings("paper", params)[section == "train"], f.name) == value


def test_num_classes_is_not_a_setting_a_user_gives():
    assert "num_classes" not in train_command_params()
    assert "num_classes" not in {f.name for f in user_settings(AlexNetConfig)}


def test_the_command_line_overrides_the_recipe_and_lrn_is_an_alias():
    model, cfg = resolve_settings("demo", train_command_params("--lr", "0.1", "--lrn", "caffe", "--no-mirror"))
    demo = load_recipe("demo")
    assert cfg.lr == 0.1 and cfg.mirror is False and cfg.lighting is True
    assert model.lrn_convention == "caffe" and model.width == demo["model"]["width"]
    assert cfg.epochs == demo["train"]["epochs"] and cfg.batch_size == demo["train"]["batch_size"]


@pytest.mark.parametrize(("text", "says"), [
    ("[train]\nlearning_rate = 0.1\n", r"unknown key train\.learning_rate; valid keys: epochs, max_steps, "),
    ("[train]\nlr = \"fast\"\n", r"train\.lr = 'fast': expected a number"),
    ("[train]\nmirror = 1\n", r"train\.mirror = 1: expected true or false"),
    ("[model]\ncrop = 62\n", r"model\.crop = 62: expected at least 63"),
    ("[model]\npool = \"max\"\n", r"model\.pool = 'max': expected one of overlap, plain"),
    ("[shards]\nshort_side = 128\n", r"model\.crop = 224: expected at most shards\.short_side \(128\)"),
    ("[shards]\nside = 128\n", r"unknown key shards\.side; valid keys: short_side"),
    ("[optim]\nlr = 0.1\n", r"unknown table or key 'optim'; a recipe holds the tables \[model\], \[train\]"),
    ("[train\n", r"not a valid TOML recipe"),
])
def test_a_bad_recipe_is_one_line_naming_the_key_and_the_file(text, says, tmp_path, cli_here):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    with pytest.raises(PipeError, match=says):
        load_recipe(recipe)
    data = tmp_path / "not-read"  # the recipe is refused before any data is opened
    out = cli_here("train", "--train", data, "--val", data, "--pca", data / "pca.json", "--out", tmp_path / "run",
                   "--recipe", recipe, check=False)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert str(recipe) in out.stderr and re.search(says, out.stderr)
    assert not (tmp_path / "run").exists()


def test_a_value_the_settings_refuse_names_the_setting_and_where_it_came_from(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[model]\ndropout = 1.0\n")
    with pytest.raises(PipeError, match=rf"{re.escape(str(recipe))}: dropout must be in \[0, 1\)"):
        resolve_settings(recipe)
    with pytest.raises(PipeError, match=r"^train: dropout must be in \[0, 1\), got 1\.5"):
        resolve_settings("paper", {"dropout": 1.5})
    with pytest.raises(PipeError, match="expected one of claims, demo, paper, tiny or a TOML file"):
        resolve_settings("nonesuch")


def test_the_readme_demo_table_states_the_demo_recipe():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("| setting (recipe key) | demo | paper | why |"):]
    rows = {m[1]: (m[2].strip(), m[3].strip()) for m in re.finditer(r"^\| `(\w+)` \| ([^|]+)\|([^|]+)\|", table, re.M)
            if not table[:m.start()].count("\n\n")}
    demo = load_recipe("demo")
    recipe = {k: v for section in demo.values() for k, v in section.items()}
    assert set(rows) == set(recipe)
    defaults = {f.name: default_of(f) for cls in SETTINGS.values() for f in fields(cls)}
    for key, (demo_cell, paper_cell) in rows.items():
        assert demo_cell == str(recipe[key]), key
        assert paper_cell == str(defaults[key]), key


def make_dry_run(*variables: str) -> str:
    """The train command `make train` would run (make -n, the setup stamp taken as done, the recipe's short side not
    read)."""
    out = subprocess.run(["make", "-n", "-o", ".venv/.setup-stamp", "train", "WORK=/nonexistent", "SHORT_SIDE=256",
                          *variables],
                         cwd=REPO, capture_output=True, text=True, timeout=60, check=True).stdout
    return next(line for line in out.replace("\\\n", " ").splitlines() if line.split()[1:2] == ["train"])


def test_the_makefile_follows_the_recipe_and_passes_only_what_the_user_set():
    demo = make_dry_run()
    assert "--recipe demo" in demo and "--epochs" not in demo and "--batch-size" not in demo and "--seed" not in demo
    real = make_dry_run("IMAGENET=/data/ilsvrc2012")
    assert "--recipe paper" in real and "--epochs" not in real
    given = make_dry_run("EPOCHS=3", "BATCH_SIZE=16", "SEED=5", "RECIPE=my.toml")
    assert all(s in given for s in ("--recipe my.toml", "--epochs 3", "--batch-size 16", "--seed 5"))


@pytest.mark.slow
def test_a_run_folder_written_before_settings_were_declared_once_resumes(tiny_run, tiny_data, tmp_path, cli,
                                                                          train_cmd):
    """The previous version recorded `train.augment` as a dict and no per-flag keys; its run must not be refused."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    recorded = json.loads((run / "_run.json").read_text())
    train = recorded["settings"]["train"]
    train["augment"] = {k: train.pop(k) for k in ("random_crop", "mirror", "lighting")}
    recorded["key"] = "0123456789abcdef"  # the old code's digest of the old form
    (run / "_run.json").write_text(json.dumps(recorded))
    out = cli(*train_cmd(tiny_data, run, epochs=3))
    assert "other settings" not in out.stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 27 and len(steps) == len(set(steps)) + 3  # 3 epoch lines share
    assert json.loads((run / "_run.json").read_text())["settings"]["train"]["mirror"] is True


def test_the_recipe_command_shows_every_setting_marks_the_recipes_own_and_gets_one_value(cli_here, tmp_path):
    shown = cli_here("recipe", "tiny").stdout.splitlines()
    assert shown[0] == "[model]" and "width = 0.125  # this recipe (paper: 1.0)" in shown and "crop = 224" in shown
    assert shown[-2:] == ["[shards]", "short_side = 256"] and "# max_steps: not set" in shown
    settings = [line for line in shown if " = " in line or line.endswith(": not set")]
    assert len(settings) == sum(len(user_settings(c)) for c in RECIPE_TABLES.values())
    small = tmp_path / "small.toml"
    small.write_text("[model]\ncrop = 64\n\n[shards]\nshort_side = 72\n")
    assert cli_here("recipe", small, "--get", "shards.short_side").stdout == "72\n"
    assert cli_here("recipe", "tiny", "--get", "train.mirror").stdout == "true\n"
    assert cli_here("recipe", "--get", "model.crop").stdout == "224\n"  # the paper's
    out = cli_here("recipe", "tiny", "--get", "shards.crop", check=False)
    assert out.returncode == 2 and out.stderr.startswith("error: shards.crop: expected a recipe key such as")


@pytest.mark.parametrize("name", recipe_names())
def test_every_shipped_recipe_resolves_and_its_crop_fits_its_short_side(name):
    model, _ = resolve_settings(name)
    assert model.crop <= load_recipe(name)["shards"].get("short_side", 256)
