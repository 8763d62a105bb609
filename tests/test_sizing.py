"""train.size: a recipe's named sizes, and `--max_minutes` with size auto choosing one for the budget from step
times measured at start, recorded in run.yaml, kept on resume, overridable."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from conftest import tiny_overrides
from fmforge.cli import main
from fmforge.config import load_recipe
from fmforge.errors import ConfigError
from fmforge.train.sizing import SizeRow, choose_size

SIZES = {"1x32": {"n_layer": 1, "n_embd": 32}, "2x64": {"n_layer": 2, "n_embd": 64},
         "3x96": {"n_layer": 3, "n_embd": 96, "n_head": 6, "n_kv_head": 3, "batch_size": 2, "lr": 1e-3}}


def recipe(tmp_path: Path, sizes=None, **train) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2,
                                              "context_length": 64},
                                    "train": {"batch_size": 4, "lr": 3e-3, **train},
                                    "sizes": SIZES if sizes is None else sizes}))
    return path


def train_options(data: Path, out: Path, **extra) -> list[str]:
    """The tiny test run's train fields (the model comes from the recipe and its sizes)."""
    args = tiny_overrides(data, out, eval_interval=1000, checkpoint_interval=1000, **extra)
    return [text for key, value in zip(args[::2], args[1::2]) if key.startswith("--train.") for text in (key, value)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1_000, 10**9), st.integers(1, 10**6), st.floats(1e-4, 10.0)),
                min_size=1, max_size=8, unique_by=lambda shape: shape[0]),
       st.floats(1.0, 1e5), st.floats(1e-3, 1e3))
def test_choose_size_takes_the_largest_size_that_gets_its_tokens_per_parameter(shapes, budget, target):
    # A larger model steps no faster: sort the step times along with the parameter counts.
    params = sorted(p for p, _, _ in shapes)
    seconds = sorted(s for _, _, s in shapes)
    rows = [SizeRow(f"s{i}", p, t) for i, (p, (_, t, _)) in enumerate(zip(params, shapes))]
    timed = []

    def step_seconds(name):
        timed.append(name)
        return seconds[int(name[1:])]

    chosen = choose_size(list(reversed(rows)), step_seconds, budget, target)
    ratios = [budget / seconds[i] * row.tokens_per_step / row.parameters for i, row in enumerate(rows)]
    meets = [r >= target for r in ratios]
    first_short = meets.index(False) if False in meets else len(rows)
    assert timed == [row.name for row in rows[:first_short + 1]]  # smallest first, none after the first short
    expected = rows[first_short - 1].name if first_short else rows[0].name
    assert chosen == expected
    for row, ratio in zip(rows, ratios):
        assert row.tokens_per_param == (pytest.approx(ratio) if row.name in timed else None)


def test_a_named_size_applies_its_fields_and_the_command_line_wins(tmp_path):
    path = recipe(tmp_path)
    run = load_recipe(path, ["--size", "3x96", "--train.lr", "5e-4"])
    model = run.model
    assert (model.n_layer, model.n_embd, model.n_head, model.n_kv_head) == (3, 96, 6, 3)
    assert model.head_dim == 16 and model.intermediate_size == 256  # derived from the size's shape, not the recipe's
    assert run.train.batch_size == 2 and run.train.lr == 5e-4 and run.train.size == "3x96"
    assert load_recipe(path, ["--size", "3x96", "--n_layer", "5"]).model.n_layer == 5
    plain = load_recipe(path, ["--size", "null"])
    assert (plain.model.n_layer, plain.model.n_embd, plain.train.size) == (2, 64, None)
    with pytest.raises(ConfigError, match="unknown size '2x46'.*did you mean '2x64'"):
        load_recipe(path, ["--size", "2x46"])


@pytest.mark.parametrize("sizes, message", [
    ({"big": {"n_layers": 8}}, "did you mean 'n_layer'"),
    ({"odd": {"n_embd": 66}}, "n_embd"),
    ({"auto": {"n_layer": 1}}, "cannot be named 'auto'"),
    ({"x": {"size": "y"}}, "size cannot be set by a size"),
    ({"x": {"n_layer": 2, "out_dir": "elsewhere"}}, "out_dir cannot be set by a size"),
    ({"x": {"train.data_dir": "other-data"}}, "data_dir cannot be set by a size"),
    ({"x": {"init_from": "runs/a"}}, "init_from cannot be set by a size"),
    ({"x": 4}, "must be a mapping"),
    ([1, 2], "must map size names"),
])
def test_a_bad_sizes_section_is_one_clear_error(tmp_path, sizes, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(recipe(tmp_path, sizes))


def test_size_auto_needs_sizes_and_cannot_start_from_a_checkpoint(tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text("model: {n_layer: 2}\n")
    with pytest.raises(ConfigError, match="has no 'sizes' section"):
        load_recipe(plain, ["--size", "auto", "--max_minutes", "1"])
    with pytest.raises(ConfigError, match="remove train.size"):
        load_recipe(recipe(tmp_path), ["--size", "auto", "--init_from", "some/checkpoint"])


def test_size_auto_chooses_by_the_budget_records_it_and_keeps_it_on_resume(prepared, tmp_path, capsys):
    from fmforge.checkpoint import read_model_config, resolve_checkpoint

    out = tmp_path / "run"
    options = train_options(prepared, out)
    # A target no size can reach: the smallest is chosen, and only it is timed.
    path = recipe(tmp_path, size="auto", tokens_per_param=1e12)
    assert main(["pretrain", "--config", str(path), *options, "--max_minutes", "0.05"]) == 0
    printed = capsys.readouterr().out
    assert "size auto:" in printed and "1x32" in printed.split("<- chosen")[0].splitlines()[-1]
    resolved = yaml.safe_load((out / "run.yaml").read_text())
    assert resolved["train"]["size"] == "1x32" and resolved["model"]["n_embd"] == 32
    sizing = resolved["resolved"]["sizing"]
    assert sizing["chosen"] == "1x32" and sizing["tokens_per_param"] == 1e12 and sizing["seconds_spent"] > 0
    assert [row["ms_per_step"] is not None for row in sizing["sizes"]] == [True, False, False]
    assert read_model_config(resolve_checkpoint(out)).n_embd == 32
    # Resumed under a target that would choose another size: the run keeps the size it started with.
    path = recipe(tmp_path, size="auto", tokens_per_param=1e-12)
    assert main(["pretrain", "--config", str(path), *options, "--max_minutes", "0.05", "--resume"]) == 0
    assert "continuing with 1x32, chosen when the run started" in capsys.readouterr().out
    # A new run under that target times every size and takes the largest.
    out2 = tmp_path / "run2"
    options[options.index(str(out))] = str(out2)
    assert main(["pretrain", "--config", str(path), *options, "--max_minutes", "0.05"]) == 0
    sizing = yaml.safe_load((out2 / "run.yaml").read_text())["resolved"]["sizing"]
    assert sizing["chosen"] == "3x96" and all(row["ms_per_step"] > 0 for row in sizing["sizes"])
    assert read_model_config(resolve_checkpoint(out2)).n_layer == 3


def test_size_auto_without_a_budget_trains_the_model_section(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    options = train_options(prepared, out, max_steps=2)
    assert main(["pretrain", "--config", str(recipe(tmp_path, size="auto")), *options]) == 0
    assert "none was given (--max_minutes)" in capsys.readouterr().out
    assert yaml.safe_load((out / "run.yaml").read_text())["model"]["n_embd"] == 64


def test_the_shakespeare_recipe_picks_among_sizes_that_grow():
    from fmforge.cli import builtin_recipe

    run = load_recipe(builtin_recipe("shakespeare"), ["--max_minutes", "1"])
    assert run.train.size == "auto" and run.train.tokens_per_param == 0.3
    counts = []
    for name in run.sizes:
        sized = run.with_size(name)
        sized.model.vocab_size = 2048
        counts.append(sized.model.num_parameters())
    assert counts == sorted(counts) and len(set(counts)) == len(counts) == 6
