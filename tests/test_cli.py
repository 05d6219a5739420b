"""The d3pm-hub command line on a tiny model: sample and eval end to end."""

import json

import pytest
from PIL import Image

from d3pm_hub.cli import main

from .conftest import tiny_pipeline

EVAL_KEYS = {
    "per_class_accuracy",
    "mean_accuracy",
    "min_class_accuracy",
    "mean_confidence",
    "confusion",
    "fd_per_class",
    "fd_overall",
    "fd_floor_per_class",
    "fd_floor_overall",
    "null_digit_rates",
    "num_inference_steps",
    "guidance_scale",
    "samples_per_label",
    "seed",
    "sampling_seconds",
    "model",
}


def test_sample_writes_a_grid(tmp_path):
    tiny_pipeline(num_levels=32).save_pretrained(tmp_path / "model")
    output = tmp_path / "grid.png"
    main(
        [
            "sample",
            "--model",
            str(tmp_path / "model"),
            "--digits",
            "1",
            "9",
            "--per-digit",
            "3",
            "--steps",
            "2",
            "--output",
            str(output),
        ]
    )
    assert Image.open(output).size == (3 * 28 * 4, 2 * 28 * 4)


def test_eval_end_to_end_writes_json_table_and_grid(tmp_path):
    tiny_pipeline(num_levels=32).save_pretrained(tmp_path / "model")
    main(
        [
            "eval",
            "--model",
            str(tmp_path / "model"),
            "--samples-per-label",
            "2",
            "--steps",
            "2",
            "--output-dir",
            str(tmp_path / "eval"),
        ]
    )
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result.keys() >= EVAL_KEYS
    assert len(result["per_class_accuracy"]) == 10 and len(result["confusion"]) == 10
    assert len(result["null_digit_rates"]) == 10 and result["num_inference_steps"] == 2
    assert "digit" in (tmp_path / "eval" / "eval.txt").read_text()
    assert (tmp_path / "eval" / "samples.png").is_file()


def test_counts_below_one_are_refused_before_anything_runs(tmp_path, capsys):
    for argv in (["eval", "--samples-per-label", "0"], ["sample", "--per-digit", "-2"]):
        with pytest.raises(SystemExit):
            main([*argv, "--output-dir" if argv[0] == "eval" else "--output", str(tmp_path / "out")])
        assert "must be an integer ≥ 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
