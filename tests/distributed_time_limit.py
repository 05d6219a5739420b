"""Run under ``torchrun --nproc_per_node 2`` with an output folder: a time limit must stop every process together.

Process 1's clock runs 1,000 s per reading, so only it is past ``max_train_seconds`` after the first step; `train`
stops on any process's limit, so both stop after one step and save it. Prints each process's step count.
"""

import itertools
import sys
import time
from types import SimpleNamespace

from accelerate import PartialState

import d3pm_hub.training
from d3pm_hub.training import train
from tests.test_training import tiny_config


def main(output_dir: str) -> None:
    rank = PartialState(cpu=True).process_index
    if rank == 1:
        readings = itertools.count(time.perf_counter(), 1000.0)
        d3pm_hub.training.time = SimpleNamespace(perf_counter=lambda: next(readings))
    losses = train(tiny_config(output_dir, max_steps=20, max_train_seconds=100.0, checkpointing_steps=0))
    print(f"rank {rank} steps {len(losses)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
