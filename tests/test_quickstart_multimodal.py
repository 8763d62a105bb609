"""`fmforge quickstart --multimodal` end to end at a tiny budget (its own module, so that pytest-xdist runs it beside
the text quickstart rather than after it)."""

import json

from conftest import run_cli


def test_multimodal_quickstart_builds_one_base_with_every_skill(tmp_path):
    """`quickstart --multimodal` at a tiny budget: text, image and audio tokenizers, one base pretrained on the
    mixture, a specialist per skill and the scorecard; a second run reuses every step."""
    import pytest
    pytest.importorskip("espeakng_loader", reason="synthetic speech needs espeakng-loader (the dev extras)")
    out = tmp_path / "mm"
    args = ["quickstart", "--multimodal", "--out", str(out), "--max-steps", "4", "--specialist-steps", "2",
            "--eval-limit", "2", "--media-limit", "60", "--codec-steps", "10", "--vocab-size", "600",
            "--batch_size", "4"]
    first = run_cli(*args, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    config = json.loads((out / "tokenizer" / "tokenizer_config.json").read_text())
    assert set(config["media"]) == {"image", "audio"}
    recipe = (out / "model" / "run.yaml").read_text()  # the base was pretrained on the three prepared directories
    assert all(f"data-{kind}" in recipe for kind in ("text", "images", "audio"))
    card = first.stdout.split("== 6/6")[1].splitlines()
    rows = {line[:16].strip(): line.split() for line in card if line[:16].strip()}
    assert {"writes code", "converses", "sees", "draws", "hears", "speaks", "sees -> speaks"} <= set(rows)
    for skill in ("sees", "hears", "speaks", "sees -> speaks"):
        assert all(0 <= float(value) <= 1 for value in rows[skill][-2:])
    assert "--adapter transcribe=" in first.stdout and "--adapter say=" in first.stdout
    second = run_cli(*args, timeout=900)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "$ fmforge tokenizer train" not in second.stdout and second.stdout.count("reusing") >= 6


def test_the_whole_run_budget_is_replanned_from_the_time_left(monkeypatch, capsys):
    """--total-minutes: pretraining gets its share of what the codecs and shards leave (less the reserves), each
    specialist an equal part of what is left when it starts, so an overrun early is absorbed by the later ones;
    a spent budget gives a floor and says so."""
    from fmforge import cli
    clock = [1000.0]
    monkeypatch.setattr(cli.time, "perf_counter", lambda: clock[0])
    plan = cli.QuickstartBudget(20, specialists=6, started=clock[0])
    clock[0] += 2.5 * 60  # codecs and shards
    trainable = 17.5 * 60 - plan.BITS_PER_BYTE_S - 6 * plan.SPECIALIST_OVERHEAD_S - plan.SCORECARD_S
    assert plan.pretrain_minutes() == round(plan.PRETRAIN_SHARE * trainable / 60, 2)
    clock[0] += 8.0 * 60  # pretraining and bits/byte
    first = plan.specialist_minutes(6)
    assert first == round((9.5 * 60 - 6 * plan.SPECIALIST_OVERHEAD_S - plan.SCORECARD_S) / 6 / 60, 2)
    clock[0] += 2 * first * 60  # the first specialist overran: the other five share less
    assert plan.specialist_minutes(5) < first
    clock[0] += 60 * 60
    assert plan.specialist_minutes(1) == plan.FLOOR_MINUTES
    assert "budget is spent" in capsys.readouterr().out


def test_a_budget_that_is_not_positive_is_one_clear_error(tmp_path):
    result = run_cli("quickstart", "--multimodal", "--out", str(tmp_path / "mm"), "--total-minutes", "0")
    assert result.returncode != 0 and "--total-minutes must be positive" in result.stderr
    assert not (tmp_path / "mm").exists()
