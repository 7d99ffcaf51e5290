"""How `medtune train` runs on several GPUs and machines: torchrun's launcher, the multi-node flags and the dry run.

The CLI parses the flags and prints; this module decides what the process does with them. Errors are raised as
MedtuneError (printed by the CLI as one line with their exit code), never as the launcher's traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medtune.errors import MedtuneError

if TYPE_CHECKING:
    from medtune.artifacts import RunDir
    from medtune.config import Config
    from medtune.ui import UI

RENDEZVOUS_TIMEOUT_S = 900  # how long the first machine waits for the others to start


def launched() -> bool:
    """Whether this process is one of a multi-GPU launch (started by `launch`, not by the user)."""
    return "LOCAL_RANK" in os.environ


def worker_args(config: Path, overrides: list[str] | None) -> list[str]:
    """`python ARGS` for each process of a launch: the same `medtune train` without the launch flags."""
    return ["-m", "medtune.cli", "train", str(config), *[f"--set={item}" for item in overrides or []]]


def end_with_launcher() -> None:
    """A process of a multi-GPU launch is killed when its launcher ends, even by SIGKILL: the launcher starts each
    in a session of its own, and an orphan would go on training and writing into the run directory."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the launcher ended before the line above
        raise SystemExit(1)


class Nodes:
    """Where this machine stands in a launch over several machines: torchrun's static rendezvous (`--nnodes`,
    `--node-rank`, `--master-addr`, `--master-port`); one machine is torchrun's `--standalone`."""

    def __init__(self, count: int = 1, rank: int = 0, master_addr: str | None = None,
                 master_port: int | None = None) -> None:
        if rank >= count:
            raise MedtuneError(f"--node-rank {rank} must be below --nnodes {count} (machines are numbered from 0)")
        if count > 1 and master_addr is None:
            raise MedtuneError("--nnodes above 1 needs --master-addr HOST (the address of the machine with "
                               "--node-rank 0, reachable from every other one) and the same --master-port on each")
        self.count, self.rank, self.master_addr, self.master_port = count, rank, master_addr, master_port or 29500

    def launch_config(self, processes: int) -> Any:
        import uuid

        from torch.distributed.launcher.api import LaunchConfig

        if self.count == 1:  # torchrun --standalone: a private rendezvous on a free port
            return LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=str(uuid.uuid4()),
                                rdzv_backend="c10d", rdzv_endpoint="localhost:0", rdzv_configs={}, max_restarts=0)
        # torchrun --nnodes N --node-rank R --master-addr HOST --master-port P: node 0 hosts the store
        return LaunchConfig(min_nodes=self.count, max_nodes=self.count, nproc_per_node=processes,
                            run_id="medtune", rdzv_backend="static",
                            rdzv_endpoint=f"{self.master_addr}:{self.master_port}",
                            rdzv_configs={"rank": self.rank, "timeout": RENDEZVOUS_TIMEOUT_S}, max_restarts=0)


def launch(processes: int, args: list[str], nodes: Nodes) -> None:
    """Run `python ARGS` as N processes of this machine, joined with the other machines' (what `torchrun` does).
    A process that fails has printed its own message; this adds one line and the exit code, not the launcher's
    traceback."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its own notes are not for users
    share = str(max(1, (os.cpu_count() or 1) // processes))
    os.environ.setdefault("OMP_NUM_THREADS", share)  # the machine's cores shared between the processes
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", share)  # torch.compile's worker pools likewise
    total = processes * nodes.count
    try:
        elastic_launch(nodes.launch_config(processes), sys.executable)(*args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
        raise MedtuneError(f"train: process {rank} of {total} stopped (exit code {failure.exitcode}); its message "
                           "is above", exit_code=code) from None
    except Exception as exc:  # the rendezvous: another machine never came, or the address is wrong
        if nodes.count == 1:
            raise
        raise MedtuneError(f"train: machine {nodes.rank} of {nodes.count} could not join the run at "
                           f"{nodes.master_addr}:{nodes.master_port} ({type(exc).__name__}: "
                           f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no detail'}); start the "
                           "same command with each --node-rank on its machine, with the same --nnodes, --master-addr "
                           "and --master-port", exit_code=1) from None


def dry_run(cfg: Config, run_dir: RunDir, ui: UI) -> dict[str, Any]:
    """The training plan of this process (tokens, steps, memory, measured speed), from a few timed steps written
    into a scratch folder: nothing of the run directory changes."""
    import tempfile

    from medtune.train.stage import run as train_run

    with tempfile.TemporaryDirectory() as scratch:
        return train_run(cfg, run_dir, Path(scratch), ui, dry_run=True)
