"""Data-parallel runs: `torchrun --nproc_per_node N -m harness.cli run ...` or `accelerate launch -m
harness.cli run ...` (any launcher that sets RANK, WORLD_SIZE and LOCAL_RANK).

Design (one writer, identical outputs):
- Rank 0 alone owns the run directory: it holds the run lock, writes run.json, every generation
  record, the fitted states, the verdicts and results.json. The other ranks only read (their RunDir
  drops writes of run.json and results.json) and generate.
- Each cell's pending samples (rank 0's resume filter, broadcast so every rank works on the same list)
  are cut into the batches a single process would make; batch j goes to rank j mod N. In each round
  every rank generates its batch (an empty one past the end) and rank 0 gathers the records over gloo
  and appends them in batch order, so generations.jsonl holds the very lines of a single-process run,
  in its order, and a kill loses at most the round in flight. Resuming with another N works: the split
  is made after the resume filter.
- Fitting (and a white-box attack's preparation) runs on rank 0 first; the others wait at a barrier
  and load the state it cached.
- After a cell's last round the other ranks move on; rank 0 judges and scores the cell, and the next
  cell's broadcast waits for it. At the end the other ranks return no records and exit 0 quietly.
Each process puts its model on its own GPU (cuda:LOCAL_RANK, as the current CUDA device) or on the CPU.
Multi-node runs follow from the launcher's own configuration (torchrun --nnodes/--rdzv-endpoint,
accelerate config), with the run directory on a file system every node shares; untested here.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

from harness.errors import DataError
from harness.lock import run_lock
from harness.store import RunDir

log = logging.getLogger(__name__)
T = TypeVar("T")
#: How long a rank may wait at a barrier (rank 0 fitting or judging a cell with an LLM can take hours).
TIMEOUT_ENV = "REALIGN_DIST_TIMEOUT_S"


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's variables; (0, 1, 0) without a launcher."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise DataError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({exc})") from None
    if world < 1 or not 0 <= rank < world:
        raise DataError(f"RANK={rank} is not within WORLD_SIZE={world}")
    return rank, world, local


def is_main() -> bool:
    """Whether this process reports (rank 0, or the only process)."""
    return env_world()[0] == 0


class RankRunDir(RunDir):
    """The run directory as one rank sees it: rank 0 writes run.json (noting the number of processes)
    and results.json; the other ranks' writes of them are dropped."""

    def __init__(self, root: Path, rank: int, world: int) -> None:
        super().__init__(root)
        self.rank, self.world = rank, world

    def write_run_info(self, info: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        if self.world > 1 and info.get("sessions"):
            info["sessions"][-1]["processes"] = self.world
        super().write_run_info(info)

    def write_results(self, records: list[dict[str, Any]]) -> None:
        if self.rank == 0:
            super().write_results(records)


@dataclass(frozen=True)
class Shard:
    """This process's place in a data-parallel run (rank 0 of 1 without a launcher)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Shard:
        """From the launcher's variables; with more than one process, join the gloo group (once), put
        this process on its own GPU when there are GPUs, and keep the other ranks' logs to errors."""
        rank, world, local = env_world()
        shard = cls(rank, world, local)
        if world > 1:
            shard._init_group()
        return shard

    @property
    def main(self) -> bool:
        return self.rank == 0

    def _init_group(self) -> None:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 24 * 3600)))
            dist.init_process_group("gloo", rank=self.rank, world_size=self.world, timeout=timeout)
        if torch.cuda.is_available():  # `cuda` and the automatic device both mean this GPU from now on
            torch.cuda.set_device(self.local_rank % torch.cuda.device_count())
        if not self.main:
            logging.getLogger().setLevel(logging.ERROR)
        log.info("data parallel: rank %d of %d (local rank %d)", self.rank, self.world, self.local_rank)

    def rundir(self, root: Path) -> RunDir:
        return RankRunDir(root, self.rank, self.world) if self.world > 1 else RunDir(root)

    def owner_lock(self, root: Path, command: str) -> contextlib.AbstractContextManager[None]:
        """The run directory's lock, held by rank 0 alone (the single writer)."""
        return run_lock(root, command) if self.main else contextlib.nullcontext()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (writes run.json, fits and caches a state); the others run it
        once it is done (reading what rank 0 wrote). A failure on rank 0 never releases the others:
        the launcher stops them when rank 0 exits."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    def agree(self, pending: Sequence[T], samples: Sequence[T]) -> list[T]:
        """Rank 0's list of pending samples on every rank (by id, taken from each rank's own `samples`)."""
        if self.world == 1:
            return list(pending)
        import torch.distributed as dist

        box: list[Any] = [[s.id for s in pending] if self.main else None]  # type: ignore[attr-defined]
        dist.broadcast_object_list(box, src=0)
        by_id = {s.id: s for s in samples}  # type: ignore[attr-defined]
        missing = [i for i in box[0] if i not in by_id]
        if missing:
            raise DataError(f"rank {self.rank}: the task yields other samples than on rank 0 (e.g. {missing[0]!r})")
        return [by_id[i] for i in box[0]]

    def rounds(self, pending: Sequence[T], batch_size: int) -> Iterator[list[T]]:
        """This rank's batch of each round: batch j of the single-process split goes to rank j mod N;
        every rank sees the same number of rounds (an empty batch past the end)."""
        batches = [list(pending[i : i + batch_size]) for i in range(0, len(pending), batch_size)]
        for first in range(0, len(batches), self.world):
            index = first + self.rank
            yield batches[index] if index < len(batches) else []

    def collect(self, records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """The round's records of every rank, in batch order, on rank 0 (empty ones left out); [] elsewhere."""
        if self.world == 1:
            return [records] if records else []
        import torch.distributed as dist

        gathered: list[Any] | None = [None] * self.world if self.main else None
        dist.gather_object(records, gathered, dst=0)
        return [r for r in gathered or [] if r]
