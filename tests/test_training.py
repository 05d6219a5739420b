"""Training: the loss falls, resume is bit-for-bit, a killed run resumes cleanly, DDP replicas agree."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from d3pm_hub import D3PMPipeline
from d3pm_hub.paths import replace_folder
from d3pm_hub.training import MAX_SEED, TrainConfig, find_latest_checkpoint, train

from .conftest import TINY_UNET, run_on_two_processes, run_until_done

REPO = Path(__file__).resolve().parent.parent
TINY_TRAINING = dict(num_levels=8, num_train_timesteps=50, batch_size=8, log_steps=1, lr_warmup_steps=0, **TINY_UNET)


def tiny_config(output_dir, **overrides) -> TrainConfig:
    return TrainConfig(output_dir=str(output_dir), **{**TINY_TRAINING, **overrides})


def tiny_cli_args(output_dir, max_steps, checkpointing_steps) -> list[str]:
    args = [f"--output-dir={output_dir}", f"--max-steps={max_steps}", f"--checkpointing-steps={checkpointing_steps}"]
    for key, value in TINY_TRAINING.items():
        flag = "--" + key.replace("_", "-")
        args += [flag, *map(str, value)] if isinstance(value, tuple) else [f"{flag}={value}"]
    return args


def test_loss_falls_and_pipeline_is_saved(tmp_path):
    losses = train(tiny_config(tmp_path, max_steps=40, loss_type="ce", learning_rate=3e-3, checkpointing_steps=0))
    assert len(losses) == 40
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8
    pipeline = D3PMPipeline.from_pretrained(tmp_path / "pipeline")
    assert pipeline([3], num_inference_steps=2, output_type="pt").images.shape == (1, 1, 28, 28)


def test_resume_continues_bit_for_bit(tmp_path):
    uninterrupted = train(tiny_config(tmp_path / "a", max_steps=6, checkpointing_steps=3))
    first_half = train(tiny_config(tmp_path / "b", max_steps=3, checkpointing_steps=3))
    second_half = train(tiny_config(tmp_path / "b", max_steps=6, checkpointing_steps=3, resume=True))
    assert first_half + second_half == uninterrupted


def test_killed_run_resumes_from_last_complete_checkpoint(tmp_path):
    command = [sys.executable, str(REPO / "training" / "train.py"), *tiny_cli_args(tmp_path, 400, 1)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while find_latest_checkpoint(tmp_path) is None or len(list((tmp_path / "checkpoints").iterdir())) < 2:
            assert process.poll() is None and time.time() < deadline, "training did not checkpoint"
            time.sleep(0.05)
        time.sleep(0.37)  # land somewhere inside a step or a save
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    # A save torn by the kill, and a stray half-written folder, must both be ignored.
    (tmp_path / "checkpoints" / ".tmp-checkpoint-99999").mkdir(exist_ok=True)
    (tmp_path / "checkpoints" / ".tmp-checkpoint-99999" / "model.safetensors").write_bytes(b"trunc")
    latest = find_latest_checkpoint(tmp_path)
    step = int(latest.name.split("-")[1])
    assert (latest / "model.safetensors").is_file() and (latest / "optimizer.bin").is_file()
    losses = train(tiny_config(tmp_path, max_steps=step + 2, checkpointing_steps=1, resume=True))
    assert len(losses) == 2


def test_bad_configs_are_refused_before_training(tmp_path):
    for overrides, message in [
        (dict(seed=MAX_SEED), "seed must be in"),
        (dict(seed=-1), "seed must be in"),
        (dict(save_dtype="fp16"), "save_dtype must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            tiny_config(tmp_path, **overrides)
    assert not (tmp_path / "train_config.json").exists()


def test_replace_folder_keeps_the_old_folder_until_the_new_one_is_in(tmp_path):
    final, temporary = tmp_path / "pipeline", tmp_path / ".tmp-pipeline"
    final.mkdir()
    (final / "old.txt").write_text("old")
    temporary.mkdir()
    (temporary / "new.txt").write_text("new")
    assert replace_folder(temporary, final) == final
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline"]
    assert [p.name for p in final.iterdir()] == ["new.txt"]


def run_launcher(prefix: list[str], output_dir: Path) -> None:
    """Run training/train.py for 4 tiny steps under a launcher; a run that stalls past 150 s fails the test."""
    run_until_done(
        [*prefix, str(REPO / "training" / "train.py"), *tiny_cli_args(output_dir, 4, 0)],
        output_dir / "launcher.log",
        timeout=150,
    )
    assert (output_dir / "pipeline" / "model_index.json").is_file()


def test_two_process_ddp_run_keeps_replicas_in_sync(tmp_path):
    """DDP over gloo on CPU: `torchrun --nproc_per_node 2 training/train.py`."""
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    run_launcher(torchrun, tmp_path)
    checksums = json.loads((tmp_path / "replica_checksums.json").read_text())
    assert len(checksums) == 2 and checksums[0] == pytest.approx(checksums[1], abs=0, rel=0)


def test_a_time_limit_on_one_process_stops_every_process_at_the_same_step(tmp_path):
    """Only process 1 is past ``max_train_seconds``; both must stop after step 1 (else one waits forever)."""
    stdout = run_on_two_processes("tests.distributed_time_limit", tmp_path / "torchrun.log", str(tmp_path))
    assert sorted(re.findall(r"rank (\d) steps (\d+)", stdout)) == [("0", "1"), ("1", "1")], stdout
    assert find_latest_checkpoint(tmp_path).name == "checkpoint-1"


def test_accelerate_launch_trains_end_to_end(tmp_path):
    run_launcher([str(Path(sys.executable).parent / "accelerate"), "launch", "--cpu", "--num_processes", "1"], tmp_path)
