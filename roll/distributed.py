"""torch.distributed for train: DDP or FSDP2 under torchrun, a no-op in one process.

Launched by torchrun (WORLD_SIZE > 1) it uses gloo on CPU and NCCL on GPU. Ranks hold whole replicas under
DDP; with `fsdp` each transformer block and the root are wrapped by FSDP2's `fully_shard`, so each rank holds
1/P of the parameters, gradients and Adam state. FSDP also runs under torchrun with one process (a process
group of one), which is how it is checked on one GPU.

Weights and optimiser state leave and enter through full (unsharded), name-keyed state dicts, so a state
saved by P ranks resumes in any number of processes, under DDP, FSDP or none (DESIGN §3.1a).

`launch` is torchrun's agent run inside `roll train --nproc P [--nnodes N …]`: one agent per machine, every
agent meeting the others over c10d at `--rdzv-endpoint` (DESIGN §5). A rendezvous that cannot complete ends
in one line after `--rdzv-timeout` seconds, before any rank exists, so nothing is committed.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from roll.errors import RollError
from roll.options import TIMEOUT_MAX, option


@dataclass(frozen=True)
class LaunchConfig:
    nnodes: int = option(1, "N: machines training together, each running this command once (one torchrun agent, "
                            "--nproc ranks); >1 needs --rdzv-endpoint.", min=1, max=4096)
    rdzv_endpoint: str | None = option(None, "HOST:PORT where the agents meet (c10d): the first node's host name "
                                             "and a free port, the same on every node.", show_default=False)
    rdzv_id: str = option("roll", "Rendezvous id, the same on every node and unique per job (e.g. the Slurm job id).")
    rdzv_timeout: int = option(600, "Seconds to wait for all --nnodes agents to join before giving up "
                                    "(torchrun's join_timeout, whole seconds).", min=1, max=int(TIMEOUT_MAX))


def torchrun_args(launch: LaunchConfig, nproc: int, argv: list[str]) -> list[str]:
    """torchrun's arguments for `roll train argv` on `nproc` ranks of this machine: `--standalone` on one
    machine, else a c10d rendezvous of `launch.nnodes` agents."""
    if launch.nnodes == 1 and launch.rdzv_endpoint is None:
        where = ["--standalone"]
    else:
        if launch.rdzv_endpoint is None:
            raise RollError(f"--nnodes {launch.nnodes} needs --rdzv-endpoint HOST:PORT (the first node's host name "
                            "and a port free there, the same on every node)")
        where = ["--nnodes", str(launch.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", launch.rdzv_endpoint,
                 "--rdzv-id", launch.rdzv_id, "--rdzv-conf", f"join_timeout={launch.rdzv_timeout}"]
    return [*where, "--nproc-per-node", str(nproc), "-m", "roll", "train", *argv]


def launch(config: LaunchConfig, nproc: int, argv: list[str], run: str) -> int:
    """Run torchrun's agent in this process for `roll train argv` (the run in $ROLL_RUN: torchrun's parser
    would take `--run` for its own --run-path); the exit status. A rendezvous or a rank that fails is said in
    one line (each rank says its own error itself) rather than torchrun's traceback and failure table; a
    rendezvous that fails is a RollError, after which nothing has run."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import parse_args, run as torchrun

    args = parse_args(torchrun_args(config, nproc, argv))
    previous, os.environ["ROLL_RUN"] = os.environ.get("ROLL_RUN"), run  # the ranks inherit this environment
    if "LOGLEVEL" not in os.environ:  # torchrun's own switch: LOGLEVEL=INFO shows the agent's rendezvous log
        # the agent's own log lines (rendezvous retries, its failure report) would bury the one line below
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun(args)
    except RendezvousError as exc:
        joined = f"{config.nnodes} agents (--nnodes)" if config.nnodes > 1 else "its ranks"
        raise RollError(f"the rendezvous at {config.rdzv_endpoint or 'localhost'} (id {config.rdzv_id}) did not gather "
                        f"{joined} within {config.rdzv_timeout} s ({type(exc).__name__}); nothing was trained. Does "
                        "every node run this command with the same --rdzv-endpoint and --rdzv-id, and reach that "
                        "port?") from None
    except ChildFailedError as exc:
        rank, failure = min(exc.failures.items())
        print(f"roll: rank {rank} on {failure.hostname} exited with status {failure.exitcode} (its error is above)",
              file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    finally:
        if previous is None:
            os.environ.pop("ROLL_RUN", None)
        else:
            os.environ["ROLL_RUN"] = previous
    return 0


class Distributed:
    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, fsdp: bool = False):
        self.rank, self.world, self.local_rank, self.fsdp = rank, world, local_rank, fsdp
        self.is_main = rank == 0
        self.active = world > 1 or fsdp

    @classmethod
    def from_env(cls, fsdp: bool = False) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if fsdp and "MASTER_ADDR" not in os.environ:
            raise RollError("--fsdp needs torchrun: use `roll train --nproc P --fsdp` or `torchrun ... -m roll train --fsdp`")
        if world == 1 and not fsdp:
            return cls()
        import torch
        import torch.distributed as td

        if not td.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # NCCL: one GPU per rank
            td.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(td.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")), fsdp)

    def device(self, requested: str) -> str:
        from roll.policy import pick_device

        device = pick_device(requested)
        return f"cuda:{self.local_rank}" if device == "cuda" and self.active else device

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as td

            td.barrier()

    def wrap(self, model):
        """The module to run forward/backward through (the optimiser is built on `model.parameters()` after
        this: FSDP replaces the parameters by their shards)."""
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            # one FSDP unit per transformer block (the classes transformers marks unsplittable), then the root
            # (embeddings, final norm, tied head): a block's full weights exist only while it runs
            blocks = set(getattr(model, "_no_split_modules", None) or ())
            for module in model.modules():
                if type(module).__name__ in blocks:
                    fully_shard(module)
            fully_shard(model)
            return model
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.local_rank] if next(model.parameters()).is_cuda else None)

    def sync_if(self, last: bool, wrapped):
        """Gradients are reduced across ranks on the last micro-batch of a step only (gradient accumulation)."""
        from contextlib import contextmanager, nullcontext

        if self.fsdp:
            @contextmanager
            def fsdp_sync():
                wrapped.set_requires_gradient_sync(last)
                yield
            return fsdp_sync()
        return nullcontext() if self.world == 1 or last else wrapped.no_sync()

    def full_state_dict(self, model):
        """FSDP: the unsharded weights on rank 0's CPU (None elsewhere, and without FSDP)."""
        if not self.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.is_main else None

    def optimizer_state(self, model, optimizer) -> dict | None:
        """The optimiser's full state keyed by parameter name, on rank 0's CPU (None on other ranks).
        Collective under FSDP: every rank must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.is_main else None

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        """Load a full, name-keyed optimiser state (every rank passes the same one; FSDP keeps its shard)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def broadcast(self, value):
        """Rank 0's `value` on every rank (any picklable value)."""
        if not self.active:
            return value
        import torch.distributed as td

        box = [value]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def all_true(self, flag: bool) -> bool:
        """True only if `flag` holds on every rank."""
        if not self.active:
            return flag
        import torch
        import torch.distributed as td

        value = torch.tensor([0.0 if flag else 1.0], device=self.device("auto") if td.get_backend() == "nccl" else "cpu")
        td.all_reduce(value)
        return float(value.item()) == 0.0

    def finish(self) -> None:
        """Barrier, then destroy the process group (a rank leaving without it can abort gloo at exit)."""
        if self.active:
            import torch.distributed as td

            td.barrier()
            td.destroy_process_group()

    def reduce_metrics(self, totals, extremes, per_row: list):
        """Sum `totals`, take the minimum of `extremes`, and concatenate every rank's `per_row` records."""
        if self.world == 1:
            return totals, extremes, per_row
        import torch.distributed as td

        td.all_reduce(totals)
        td.all_reduce(extremes, op=td.ReduceOp.MIN)
        gathered = [None] * self.world
        td.all_gather_object(gathered, per_row)
        return totals, extremes, [record for part in gathered for record in part]
