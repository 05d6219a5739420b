"""Run under ``torchrun --nproc_per_node 2``: early stopping must end every process at the same step.

Process 0 sees a flat concept loss (alone it would stop after ``patience`` steps), process 1 an improving one;
`optimise_increment` decides on their mean, so both stop together. Prints each process's step count.
"""

import torch
from accelerate import PartialState

from d3pm_hub.erasure.common import EarlyStopping, optimise_increment, select_parameters
from tests.conftest import tiny_pipeline


def main() -> None:
    rank = PartialState(cpu=True).process_index
    unet = tiny_pipeline().unet
    calls = []

    def loss_fn(model, generator):
        calls.append(None)
        x_t = torch.zeros(1, 1, 28, 28, dtype=torch.long)
        loss = model(x_t, torch.tensor([5]), torch.tensor([3])).float().square().mean()
        concept = torch.tensor(1.0 if rank == 0 else 1.0 / len(calls))
        return {"loss": loss, "concept": concept}

    result = optimise_increment(
        unet,
        select_parameters(unet, "context"),
        loss_fn,
        steps=12,
        learning_rate=1e-3,
        early_stopping=EarlyStopping(patience=3),
    )
    print(f"rank {rank} steps {result.steps}", flush=True)


if __name__ == "__main__":
    main()
