"""Training a D3PM with Accelerate: hybrid loss, label dropout, EMA, atomic checkpoints, exact resume.

Every random draw of optimisation step k (batch indices, label dropout, timesteps, forward noise) comes from
generators seeded by (seed, k, process), so a run resumed from checkpoint k continues bit for bit.
Checkpoints are written to a temporary folder and renamed into place: a run killed mid-save leaves
no half-written ``checkpoint-N`` behind.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from tqdm.auto import tqdm

from .data import dataset_to_tensors, load_mnist
from .paths import replace_folder
from .pipeline import D3PMPipeline
from .scheduler import D3PMScheduler
from .unet import D3PMUNet

logger = logging.getLogger(__name__)
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
LOSS_TYPES = ("hybrid", "ce")
SAVE_DTYPES = ("float16", "bfloat16", "float32")
MAX_SEED = 2**23  # step_generator packs (seed, micro-step, process) into one 64-bit seed: seed << 40


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as ``train_config.json`` beside the pipeline."""

    output_dir: str = "outputs/d3pm-mnist"
    data_source: str = "embedded"
    num_levels: int = 32
    transition_type: str = "uniform"
    num_train_timesteps: int = 1000
    loss_type: str = "hybrid"
    hybrid_loss_coeff: float = 0.001
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    cross_attention_dim: int = 64
    attention_head_dim: int = 8
    state_embedding_dim: int = 32
    norm_num_groups: int = 8
    batch_size: int = 128
    max_steps: int = 2000
    max_train_seconds: float | None = None
    learning_rate: float = 1e-3
    lr_warmup_steps: int = 100
    adam_weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    label_dropout: float = 0.1
    ema_decay: float = 0.999
    checkpointing_steps: int = 500
    checkpoints_total_limit: int = 2
    sample_steps: int = 0
    log_steps: int = 50
    seed: int = 0
    resume: bool = False
    report_to: str | None = None
    save_dtype: str = "float16"

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}.")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}.")
        if self.max_steps < 1 or self.batch_size < 1:
            raise ValueError("max_steps and batch_size must be positive.")
        if not 0 <= self.seed < MAX_SEED:
            raise ValueError(f"seed must be in 0..{MAX_SEED - 1} (it seeds every step's generator), got {self.seed}.")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"save_dtype must be one of {SAVE_DTYPES}, got {self.save_dtype!r}.")


def build_pipeline(config: TrainConfig) -> D3PMPipeline:
    """A freshly initialised pipeline for ``config``."""
    scheduler = D3PMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        num_classes=config.num_levels,
        transition_type=config.transition_type,
        hybrid_loss_coeff=config.hybrid_loss_coeff,
    )
    unet = D3PMUNet(
        num_levels=config.num_levels,
        num_states=scheduler.num_states,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        cross_attention_dim=config.cross_attention_dim,
        attention_head_dim=config.attention_head_dim,
        state_embedding_dim=config.state_embedding_dim,
        norm_num_groups=config.norm_num_groups,
    )
    return D3PMPipeline(unet=unet, scheduler=scheduler)


def step_generator(seed: int, step: int, process: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for one micro-step of one process: a pure function of (seed, step, process)."""
    return torch.Generator(device).manual_seed((seed << 40) + (step << 8) + process)


def diffusion_loss(
    unet: torch.nn.Module,
    scheduler: D3PMScheduler,
    x0: torch.LongTensor,
    labels: torch.LongTensor,
    generator: torch.Generator,
    loss_type: str = "hybrid",
    encoder_hidden_states: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample t ~ U{1..T} and x_t ~ q(x_t | x0), predict x0, and return the hybrid (or CE) loss.

    Args:
        x0: ``(B, 1, H, W)`` int64 levels; labels: ``(B,)``; encoder_hidden_states: optional context override.
    """
    T = scheduler.config.num_train_timesteps
    timesteps = torch.randint(1, T + 1, (len(x0),), generator=generator, device=generator.device).to(x0.device)
    x_t = scheduler.add_noise(x0, timesteps, generator)
    logits = unet(x_t, timesteps, labels, encoder_hidden_states=encoder_hidden_states)
    if loss_type == "ce":
        return F.cross_entropy(logits.float(), x0[:, 0])
    return scheduler.hybrid_loss(logits, x0, x_t, timesteps)["loss"]


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step (temporary folders of an interrupted save are ignored)."""
    folder = Path(output_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("checkpoint-*") if (m := CHECKPOINT_PATTERN.match(p.name))]
    return max(found)[1] if found else None


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, total_limit: int) -> Path:
    """``accelerator.save_state`` into a temp folder, then an atomic rename to ``checkpoint-{step}``."""
    folder = output_dir / "checkpoints"
    final, temporary = folder / f"checkpoint-{step}", folder / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_folder(temporary, final)
        older = sorted(
            (int(m.group(1)), p) for p in folder.glob("checkpoint-*") if (m := CHECKPOINT_PATTERN.match(p.name))
        )
        for _, stale in older[:-total_limit]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_pipeline_atomically(pipeline: D3PMPipeline, output_dir: Path, dtype: torch.dtype) -> None:
    """``save_pretrained`` (weights in ``dtype``) to a sibling temp folder, then swap it into ``output_dir/pipeline``.

    ``pipeline`` itself is left in float32, also when saving fails.
    """
    final, temporary = output_dir / "pipeline", output_dir / ".tmp-pipeline"
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        pipeline.unet.to(dtype)
        pipeline.save_pretrained(temporary)
    finally:
        pipeline.unet.to(torch.float32)
    replace_folder(temporary, final)


def save_sample_grid(pipeline: D3PMPipeline, path: Path, seed: int, steps: int = 25) -> None:
    """One sample of each digit 0..9 as a PNG strip."""
    generator = torch.Generator(pipeline.device).manual_seed(seed)
    images = pipeline(list(range(10)), num_inference_steps=steps, generator=generator).images
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(images, rows=1, cols=10).save(path)


def train(config: TrainConfig) -> list[float]:
    """Train, checkpoint, and save the EMA pipeline to ``{output_dir}/pipeline``; returns per-step losses."""
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=config.report_to,
        project_dir=str(output_dir),
    )
    set_seed(config.seed)
    pipeline = build_pipeline(config)
    unet, scheduler = pipeline.unet, pipeline.scheduler
    images, labels = dataset_to_tensors(load_mnist(config.data_source, "train"), config.num_levels)
    images, labels = images.to(accelerator.device), labels.to(accelerator.device)

    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=config.adam_weight_decay)
    lr_scheduler = get_scheduler(
        "constant_with_warmup", optimizer, num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    ema = EMAModel(unet.parameters(), decay=config.ema_decay, foreach=True)
    accelerator.register_for_checkpointing(ema)

    start_step = 0
    latest = find_latest_checkpoint(output_dir) if config.resume else None
    if latest is not None:
        accelerator.load_state(str(latest))  # loads the EMA's shadow parameters onto the CPU
        start_step = int(CHECKPOINT_PATTERN.match(latest.name).group(1))
        logger.info("Resumed from %s (step %d).", latest, start_step)
    ema.to(accelerator.device)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.json").write_text(json.dumps(asdict(config), indent=2))
        if config.report_to:
            accelerator.init_trackers("d3pm-hub", config={k: str(v) for k, v in asdict(config).items()})

    losses = run_training_loop(
        accelerator,
        config,
        unet,
        scheduler,
        optimizer,
        lr_scheduler,
        ema,
        images,
        labels,
        start_step,
        output_dir,
    )

    accelerator.wait_for_everyone()
    record_replica_checksums(accelerator, unet, output_dir)
    if accelerator.is_main_process:
        final_unet = accelerator.unwrap_model(unet)
        ema.copy_to(final_unet.parameters())
        final_pipeline = D3PMPipeline(unet=final_unet, scheduler=scheduler)
        save_pipeline_atomically(final_pipeline, output_dir, getattr(torch, config.save_dtype))
    # Free the DDP wrapper while the process group is still registered. Its reducer holds the group: were it freed
    # last there, ~ProcessGroupGloo would join gloo's threads with the GIL held while one of them needs the GIL to
    # release a finished collective's tensors, a deadlock (pytorch/pytorch#56297; 2 of 15 2-process CPU runs hung).
    del unet
    accelerator.free_memory()  # drops the accelerator's reference, the last one
    accelerator.end_training()
    return losses


def record_replica_checksums(accelerator: Accelerator, unet: torch.nn.Module, output_dir: Path) -> None:
    """Write every process's parameter checksum to ``replica_checksums.json``: DDP replicas must agree."""
    checksum = torch.stack([p.detach().double().sum() for p in unet.parameters()]).sum()
    checksums = accelerator.gather(checksum.reshape(1).to(accelerator.device)).tolist()
    if accelerator.is_main_process:
        (output_dir / "replica_checksums.json").write_text(json.dumps(checksums))


def run_training_loop(
    accelerator, config, unet, scheduler, optimizer, lr_scheduler, ema, images, labels, start_step, output_dir
) -> list[float]:
    """Optimisation steps ``start_step+1 .. max_steps`` (or until ``max_train_seconds``)."""
    null_label = accelerator.unwrap_model(unet).null_label
    per_process_batch = config.batch_size // accelerator.num_processes
    losses: list[float] = []
    started = time.perf_counter()
    progress = tqdm(
        range(start_step, config.max_steps),
        initial=start_step,
        total=config.max_steps,
        disable=not accelerator.is_local_main_process,
        desc="train",
    )
    unet.train()
    for step in progress:
        for micro in range(config.gradient_accumulation_steps):
            micro_step = step * config.gradient_accumulation_steps + micro
            index_generator = step_generator(config.seed, micro_step, accelerator.process_index)
            noise_generator = step_generator(config.seed, micro_step, accelerator.process_index, accelerator.device)
            index = torch.randint(0, len(images), (per_process_batch,), generator=index_generator)
            x0, y = images[index.to(images.device)], labels[index.to(labels.device)]
            drop = torch.rand(len(y), generator=index_generator) < config.label_dropout
            y = torch.where(drop.to(y.device), torch.full_like(y, null_label), y)
            with accelerator.accumulate(unet), accelerator.autocast():
                loss = diffusion_loss(unet, scheduler, x0, y, noise_generator, config.loss_type)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
        ema.step(unet.parameters())
        done = step + 1
        elapsed = time.perf_counter() - started
        out_of_time = config.max_train_seconds is not None and elapsed > config.max_train_seconds
        # One collective for both: every process must stop at the same step, or the others wait on it forever.
        loss_value, share_out_of_time = accelerator.reduce(
            torch.stack([loss.detach().float(), torch.tensor(float(out_of_time), device=loss.device)]), "mean"
        ).tolist()
        losses.append(loss_value)
        images_per_second = (done - start_step) * config.batch_size * config.gradient_accumulation_steps / elapsed
        if done % config.log_steps == 0 or done == config.max_steps:
            progress.set_postfix(loss=f"{loss_value:.4f}", images_per_s=f"{images_per_second:.0f}")
            accelerator.log({"loss": loss_value, "images_per_second": images_per_second}, step=done)
        if config.checkpointing_steps and done % config.checkpointing_steps == 0:
            save_checkpoint(accelerator, output_dir, done, config.checkpoints_total_limit)
        if config.sample_steps and done % config.sample_steps == 0 and accelerator.is_main_process:
            save_ema_samples(
                accelerator, unet, scheduler, ema, output_dir / "samples" / f"step-{done}.png", config.seed
            )
        if share_out_of_time > 0:  # any process
            save_checkpoint(accelerator, output_dir, done, config.checkpoints_total_limit)
            break
    return losses


def save_ema_samples(accelerator, unet, scheduler, ema, path: Path, seed: int) -> None:
    """Sample a grid with the EMA weights, then put the training weights back."""
    model = accelerator.unwrap_model(unet)
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    model.eval()
    save_sample_grid(D3PMPipeline(unet=model, scheduler=scheduler), path, seed)
    model.train()
    ema.restore(model.parameters())
