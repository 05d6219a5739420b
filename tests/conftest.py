"""Shared fixtures: tiny components, offline Hub, CPU only."""

import os
import signal
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

from d3pm_hub import D3PMPipeline, D3PMScheduler, D3PMUNet  # noqa: E402
from d3pm_hub.deltas import ConceptDelta  # noqa: E402
from d3pm_hub.erasure import erase_separable_jointly, train_pair_interactions  # noqa: E402
from d3pm_hub.erasure.common import logit_divergence  # noqa: E402
from d3pm_hub.erasure.posterior import TargetPool, null_label_target  # noqa: E402
from d3pm_hub.training import TrainConfig, train  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# Multi-process CPU runs: gloo on the loopback interface (the host name may resolve to an address the ranks cannot
# reach quickly), one thread per process.
GLOO_ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def run_until_done(command: list[str], log: Path, timeout: float = 240) -> str:
    """Run ``command`` (in `GLOO_ENV`) in its own process group, its output in ``log``; returns that output.

    A run past ``timeout`` seconds has its whole group killed (every rank under a launcher) and fails the test.
    """
    with log.open("w") as output:  # a file, not a pipe: a killed run's orphans cannot block the read
        process = subprocess.Popen(
            command, cwd=REPO, env=GLOO_ENV, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise AssertionError(f"stalled past {timeout} s:\n{log.read_text()[-3000:]}") from None
    assert process.returncode == 0, log.read_text()[-3000:]
    return log.read_text()


def run_on_two_processes(module: str, log: Path, *args: str) -> str:
    """``torchrun --standalone --nproc_per_node 2 -m module *args`` over gloo on the CPU; returns its output."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return run_until_done([*torchrun, "-m", module, *args], log)


# Tiny models run fastest on one thread, and multi-threaded small ops slow to a crawl on a busy 2-core machine.
torch.set_num_threads(1)

TINY_UNET = dict(
    block_out_channels=(16, 16, 16),
    state_embedding_dim=8,
    cross_attention_dim=16,
    attention_head_dim=8,
    norm_num_groups=8,
)


def tiny_pipeline(num_levels: int = 8, transition_type: str = "uniform", seed: int = 0) -> D3PMPipeline:
    """A randomly initialised pipeline small enough for unit tests (T = 50, K = num_levels)."""
    torch.manual_seed(seed)
    scheduler = D3PMScheduler(num_train_timesteps=50, num_classes=num_levels, transition_type=transition_type)
    unet = D3PMUNet(num_levels=num_levels, num_states=scheduler.num_states, **TINY_UNET)
    return D3PMPipeline(unet=unet, scheduler=scheduler)


@pytest.fixture
def pipeline() -> D3PMPipeline:
    return tiny_pipeline()


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> D3PMPipeline:
    """A tiny class-conditional D3PM (K = 8, T = 50, D = 32) trained for a few seconds on MNIST."""
    output = tmp_path_factory.mktemp("tiny-trained")
    config = TrainConfig(
        output_dir=str(output),
        num_levels=8,
        num_train_timesteps=50,
        batch_size=16,
        max_steps=150,
        loss_type="ce",
        learning_rate=3e-3,
        lr_warmup_steps=0,
        ema_decay=0.9,
        checkpointing_steps=0,
        save_dtype="float32",
        **{**TINY_UNET, "cross_attention_dim": 32},
    )
    train(config)
    pipeline = D3PMPipeline.from_pretrained(output / "pipeline")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


PAIR_SETTINGS = dict(steps=90, learning_rate=1e-2, batch_size=8, trajectories=4, eval_trajectories=2)


@pytest.fixture(scope="session")
def singles(trained) -> list[ConceptDelta]:
    """Jointly trained separable deltas of 4, 7 and 9 on the fixture model."""
    return erase_separable_jointly(trained, [4, 7, 9], steps=60, null_alpha=1.0, learning_rate=1e-2, batch_size=8)


@pytest.fixture(scope="session")
def paired(trained, singles) -> tuple[list[ConceptDelta], dict[str, list[float]]]:
    """``singles`` with their pair terms (`train_pair_interactions`, one round) and each pair's held-out KL."""
    return train_pair_interactions(trained, singles, **PAIR_SETTINGS)


REFINE_SETTINGS = dict(rounds=1, refine_steps=60, refine_learning_rate=1e-2, refine_trajectories=4)


@pytest.fixture(scope="session")
def stronger(trained, paired) -> list[ConceptDelta]:
    """``paired``'s deltas after one more pair round to a stronger target (β = 3; the singles' is 1)."""
    return train_pair_interactions(trained, paired[0], refine=True, **REFINE_SETTINGS, null_alpha=3.0)[0]


@pytest.fixture(scope="session")
def targeted(trained, paired) -> tuple[list[ConceptDelta], dict[str, list[float]]]:
    """``paired``'s deltas after one more round of the 4+9 term only, to a stronger target (β = 3, away from
    each of the two digits: ``null_combine="sum"``, half as hard from 4) on the states with 15 ≤ t ≤ 35 (of 50),
    and its KL."""
    settings = REFINE_SETTINGS | {"null_alpha": 3.0, "refine_timesteps": [15, 35], "null_combine": "sum"}
    settings |= {"null_weights": {"4": 0.5}}
    return train_pair_interactions(trained, paired[0], refine=True, pairs=["9+4"], **settings)


@torch.no_grad()
def null_target_mismatch(pipeline, parameters, digits, **target) -> float:
    """KL(p* ‖ edited null label) in nats per pixel on noised real digits; p* the ``null_label_target`` of
    ``digits`` (by default guidance away from them, β = 1)."""
    pool = TargetPool.build(pipeline.unet, pipeline.scheduler, 64, torch.Generator().manual_seed(1), torch.float32)
    target = null_label_target(pool.log_null, pool.log_labels, pool.posterior, digits, **{"beta": 1.0} | target)
    null = torch.func.functional_call(pipeline.unet, parameters, (pool.x_t, pool.timesteps, torch.full((64,), 10)))
    return logit_divergence(null, target, "kl").item()


def run_erase_script(trained, tmp_path, launcher: list[str], *arguments: str) -> None:
    """``training/erase.py`` (under ``launcher``, e.g. ``accelerate launch``) on the fixture model → tmp/deltas."""
    trained.save_pretrained(tmp_path / "base")
    prefix = [str(Path(sys.executable).parent / launcher[0]), *launcher[1:]] if launcher else [sys.executable]
    command = [*prefix, str(REPO / "training" / "erase.py"), *arguments]
    command += ["--model", str(tmp_path / "base"), "--output-dir", str(tmp_path / "deltas")]
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": str(Path(sys.executable).parent)}
    subprocess.run(command, check=True, capture_output=True, env=env, timeout=300)
