"""One run spread over many processes: under torchrun (any number of GPUs and nodes) or as the N independent
shards of a scheduler's job array (`--shard K/N`). Every process plans the whole run, takes its share of the
batches, and makes exactly the images a single process would make for them."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from .errors import UsageError
from .jobs import Job

TIMEOUT_ENV = "ZIMAGE_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 600.0  # seconds a process may stay silent (or take to join) before the others give up on it
BEAT = 2.0  # seconds between heartbeats


@dataclass(frozen=True)
class Shard:
    """Which share of the run this process makes: `rank` of `world`, and whether its peers run with it
    (torchrun: they can talk, rank 0 reports for all) or on their own (`--shard`: each reports its share)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun with peers
    group_rank: int = 0  # rank among the torchrun peers
    group_size: int = 1


def parse_shard(text: str) -> tuple[int, int]:
    """K and N of `--shard K/N`, 0 <= K < N."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard must look like K/N, e.g. 0/4 (got '{text}')") from None
    if not 0 <= k < n:
        raise UsageError(f"--shard {text}: K must be between 0 and N-1")
    return k, n


def current(shard: str | None = None, env: dict | None = None) -> Shard:
    """This process's share, from `--shard K/N` and torchrun's RANK, WORLD_SIZE and LOCAL_RANK. Both together
    split each of the N shards between the torchrun processes."""
    env = os.environ if env is None else env
    k, n = parse_shard(shard) if shard else (0, 1)
    try:
        rank, size, local = (int(env.get(v, d)) for v, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    except ValueError:
        raise UsageError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if not 0 <= rank < size:
        raise UsageError(f"RANK {rank} is outside WORLD_SIZE {size}")
    return Shard(k * size + rank, n * size, local, size > 1, rank, size)


def cost(batch: list[Job]) -> int:
    """Relative work of a batch: pixels x steps x images, twice with CFG."""
    s = batch[0].settings
    return s.width * s.height * s.num_steps * len(batch) * (2 if s.guidance_scale > 0 else 1)


def owners(batches: list[list[Job]], world: int) -> list[int]:
    """The process of each batch: each in turn goes to the least loaded one (the lowest rank on ties), so the
    split depends only on the plan and no process waits on another."""
    load = [0] * world
    out = []
    for batch in batches:
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += cost(batch)
        out.append(r)
    return out


def share(batches: list[list[Job]], shard: Shard) -> list[list[Job]]:
    """The batches this process makes."""
    return [b for b, r in zip(batches, owners(batches, shard.world)) if r == shard.rank]


def digest(jobs: list[Job]) -> str:
    """A fingerprint of the planned run, equal in every process only when all planned the same images."""
    from .resume import comparable

    text = json.dumps([[j.index, str(j.output), comparable(j.metadata)] for j in jobs], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def local_device(device, shard: Shard):
    """The GPU of this process's local rank when the run asks for CUDA without naming a GPU."""
    import torch

    if shard.launched and device.type == "cuda" and device.index is None:
        return torch.device("cuda", shard.local_rank)
    return device


def timeout() -> float:
    try:
        return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    except ValueError:
        raise UsageError(f"{TIMEOUT_ENV} must be a number of seconds") from None


class Group:
    """The torchrun processes of a run: a process group (gloo on CPU, NCCL on CUDA) to check that all planned
    the same run, and torchrun's key-value store to collect the results at rank 0 without a collective that
    could hang: every process beats a heartbeat, and rank 0 stops waiting for one that went silent."""

    def __init__(self, shard: Shard, device):
        import torch
        import torch.distributed as dist

        self.shard, self.limit = shard, timeout()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        store, _, _ = next(dist.rendezvous("env://", timeout=timedelta(seconds=self.limit)))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # keys of a restarted group start afresh
        self.store = dist.PrefixStore(f"zimage/{attempt}", store)
        self.lock = threading.Lock()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                store=dist.PrefixStore(f"zimage-pg/{attempt}", store),
                                rank=shard.group_rank, world_size=shard.group_size,
                                timeout=timedelta(seconds=self.limit))
        self.stopping = threading.Event()
        self.beater = threading.Thread(target=self.beat, daemon=True)
        self.beater.start()
        atexit.register(self.leave)  # also on errors: a thread or group still open at exit aborts the process

    def beat(self) -> None:
        while not self.stopping.is_set():
            try:
                with self.lock:
                    self.store.add(f"beat/{self.shard.group_rank}", 1)
            except RuntimeError:  # the store went away with the launcher: nobody is listening any more
                return
            self.stopping.wait(BEAT)

    def agree(self, plan: str) -> bool:
        """Whether every process planned the same run (the fingerprints of `digest`); also waits for all to
        have planned, so none writes a file before the others have looked at theirs."""
        import torch.distributed as dist

        everyone: list = [None] * self.shard.group_size
        dist.all_gather_object(everyone, plan)
        return all(p == plan for p in everyone)

    def wait(self, key: str, ranks: list[int]) -> dict[int, str | None]:
        """`key` of each rank, polled; None for a rank whose heartbeat stopped for longer than the timeout."""
        got: dict[int, str | None] = {}
        last: dict[int, tuple[int, float]] = {}
        while len(got) < len(ranks):
            for r in ranks:
                if r in got:
                    continue
                try:
                    with self.lock:
                        if self.store.check([f"{key}/{r}"]):
                            got[r] = self.store.get(f"{key}/{r}").decode()
                            continue
                        beats = self.store.add(f"beat/{r}", 0)
                except RuntimeError:  # the store is gone (it lived in rank 0, which has finished)
                    got[r] = None
                    continue
                if last.get(r, (None,))[0] != beats:
                    last[r] = (beats, time.monotonic())
                elif time.monotonic() - last[r][1] > self.limit:
                    got[r] = None
            time.sleep(0.2)
        return got

    def gather(self, payload: dict) -> list[dict | None] | None:
        """At rank 0, every process's payload in rank order (None for a process that stopped answering);
        elsewhere None, once rank 0 has collected them."""
        others = [r for r in range(self.shard.group_size) if r != self.shard.group_rank]
        if self.shard.group_rank != 0:
            with self.lock:
                self.store.set(f"result/{self.shard.group_rank}", json.dumps(payload))
            self.wait("finished", [0])
            return None
        got = self.wait("result", others)
        return [payload if r == 0 else (json.loads(got[r]) if got[r] is not None else None)
                for r in range(self.shard.group_size)]

    def close(self) -> None:
        """Tell the others that rank 0 has reported, and leave the group."""
        if self.shard.group_rank == 0:
            with self.lock:
                self.store.set("finished/0", "1")
        self.leave()

    def leave(self) -> None:
        import torch.distributed as dist

        if self.stopping.is_set():
            return
        self.stopping.set()
        self.beater.join()
        if dist.is_initialized():
            dist.destroy_process_group()
