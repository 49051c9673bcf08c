"""The processes of a launch (`accelerate launch`, torchrun), or the one process of a plain
run: they coordinate through accelerate's `PartialState` (rank, world size, barriers, object
broadcast and gather); no job system of our own."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from dalle2_cli.errors import InputError

# Barriers wait for rank 0's downloads (several GB for the LAION models) and for the slowest
# process's last batch; torch's default of 30 minutes is too short for the first.
BARRIER_TIMEOUT = timedelta(hours=6)


class MainRefused(InputError):
    """The main process's refusal, raised on the other processes too so that all stop; the
    main process reports it, so the others need not print the same line again."""


def world_size() -> int:
    """Processes in this launch, from the launcher's environment (1 when not launched)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def launched() -> bool:
    """Running under `accelerate launch` (any number of processes) or torchrun."""
    return "WORLD_SIZE" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ


class ProcessLog:
    """Model loading says the same on every process: only the main one says it. What comes
    later (a prompt cut short in this process's batches) is said with the process number."""

    def __init__(self, process: int, say: Callable[[str], None]):
        self.process, self.say, self.loading = process, say, True

    def __call__(self, message: str) -> None:
        if self.process == 0:
            self.say(message)
        elif not self.loading:
            self.say(f"process {self.process}: {message}")


@contextmanager
def process_group() -> Iterator[Any]:
    """accelerate's `PartialState` for this run. Under a launch, the process group is
    destroyed when the run ends: one run per launched process."""
    from accelerate import PartialState

    if world_size() == 1:
        yield PartialState(cpu=True)
        return
    # Gloo whatever the device: the processes exchange only small objects (a plan, counts,
    # records), which gloo does without taking GPU memory, and several processes may then
    # share one GPU (which NCCL refuses).
    state = PartialState(cpu=True, backend="gloo", timeout=BARRIER_TIMEOUT)
    try:
        yield state
        state.wait_for_everyone()  # no process tears down while another still sends to it
    finally:
        # Left to the interpreter's exit, gloo's threads can abort the process after its work
        # is done ("terminate called without an active exception", pytorch issue 190489).
        state.destroy_process_group()


def device_for(name: str | None, local_process: int) -> str:
    """Each process on its own GPU unless one was named (`cuda:N`): local process i on GPU i
    (modulo the count, so that several processes can share a GPU)."""
    import torch

    from dalle2_cli.loading.devices import resolve_device

    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_process % torch.cuda.device_count())
    return str(device)


def one_for_all(state: Any, value: Any) -> Any:
    """The main process's `value`, on every process."""
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value if state.is_main_process else None])[0]


def all_agree(state: Any, error: InputError | None) -> None:
    """Stop every process when any one found a problem; the main process reports the first
    (its own as it is, another's naming the process)."""
    messages = [str(error) if error is not None else None]
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        messages = gather_object(messages)
    errors = [(process, message) for process, message in enumerate(messages) if message]
    if errors:
        process, message = errors[0]
        if not state.is_main_process:
            raise MainRefused(message)
        if process == 0 and error is not None:
            raise error
        raise InputError(f"process {process}: {message}")
