"""Bounded worker processes: a job in, a reply out, each within a deadline, whatever the job does.

The math verifier (math-verify on model output) and users' reward functions (`roll verify --reward`) both run
code that may hang, raise, eat memory or kill its own process. Both run it here, in plain subprocesses that
speak one JSON line per message over stdin/stdout:

* the worker says `"ready"` once its slow imports are done (so a job's clock never counts start-up), or sends
  one other message saying why it cannot start (a reward function that cannot be imported), and exits;
* then for each job line it writes one reply line, and exits at end of input (the parent closed the pipe or
  died).

The parent (`WorkerPool.run`) feeds jobs to idle workers and gives each job `timeout_s` from the moment it was
sent: a worker past its deadline is killed, the job's outcome is the error `timeout after X s`, and a fresh
worker takes its place; a worker that dies on a job (killed by the OS, a crash in C code, `os._exit`) gives
`worker died (exit code N)` and is replaced too. That bound holds whichever thread or process calls `run`.
Each worker also carries a kernel CPU budget per job (RLIMIT_CPU), so a parent killed outright leaves no worker
computing on, and an address-space cap, so a runaway job fails rather than the host.

    with WorkerPool(command, timeout_s=5.0, workers=2, name="math verifier") as pool:
        outcomes = pool.run([(0, ["\\\\frac12", "0.5", False]), (1, ["2", "3", False])])
"""
from __future__ import annotations

import collections
import json
import multiprocessing.connection
import os
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable

from roll.errors import RollError

STARTUP_TIMEOUT_S = 120.0  # a spawned worker imports SymPy (or a user's module); slow on a loaded 2-core machine
WORKER_MEMORY_BYTES = 4 << 30  # address-space cap per worker process
CPU_SLACK_S = 2  # a worker's CPU budget per job is the time bound plus this (whole seconds)


@dataclass(frozen=True)
class Outcome:
    """What became of one job: the worker's reply, or None and why not (timeout, worker died)."""

    reply: object
    error: str
    milliseconds: float


# ------------------------------------------------------------------------------------------- worker side


class Channel:
    """A worker's side of the protocol: the JSON lines it reads jobs from and writes replies to."""

    def __init__(self, requests, replies):
        self.requests, self.replies = requests, replies

    def reply(self, message) -> None:
        self.replies.write(json.dumps(message) + "\n")
        self.replies.flush()


def start_worker() -> Channel:
    """A worker's first lines, before its imports. Ctrl-C is for the parent (which then stops us); the address
    space is capped (a runaway SymPy number or a user's runaway list fails, not the host); the protocol takes
    stdin and stdout, so a stray print() (at import or in a job) goes to stderr and the jobs' code reads an
    empty stdin."""
    import resource
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lower_limit(resource.RLIMIT_AS, WORKER_MEMORY_BYTES)
    channel = Channel(os.fdopen(os.dup(0), "r"), os.fdopen(os.dup(1), "w"))
    os.dup2(2, 1)
    with open(os.devnull) as devnull:
        os.dup2(devnull.fileno(), 0)
    return channel


def serve(channel: Channel, handle: Callable[[list], object], timeout_s: float,
          on_error: Callable[[str], object]) -> None:
    """A worker's loop once its imports are done: says "ready", then answers each job line with `handle(job)`;
    an exception in `handle` becomes `on_error("Type: message")` as that job's reply."""
    import resource  # Unix only, like the rest of the worker machinery

    channel.reply("ready")
    for line in channel.requests:
        # The parent kills us at the deadline; this CPU budget (SIGXCPU from the kernel) is the backstop for
        # when the parent itself was killed and a job that holds the GIL in C code would otherwise run on.
        used = resource.getrusage(resource.RUSAGE_SELF)
        lower_limit(resource.RLIMIT_CPU, int(used.ru_utime + used.ru_stime + timeout_s) + CPU_SLACK_S)
        try:
            message = handle(json.loads(line))
        except MemoryError:
            message = on_error("out of memory")
        except Exception as exc:  # noqa: BLE001 - any failure on one job is that job's error
            message = on_error(f"{type(exc).__name__}: {str(exc)[:200]}")
        channel.reply(message)


def lower_limit(which: int, value: int) -> None:
    """Set a resource's soft limit to `value`, or to its hard limit where that is lower."""
    import resource

    _, hard = resource.getrlimit(which)
    resource.setrlimit(which, (value if hard == resource.RLIM_INFINITY else min(value, hard), hard))


# ------------------------------------------------------------------------------------------- parent side


class _Worker:
    """One worker process and the job it holds: (result index, payload) or None.

    A plain subprocess rather than multiprocessing: spawn/forkserver children re-import the caller's
    __main__, which breaks any script without an `if __name__ == "__main__"` guard, and fork is unsafe in a
    process that already runs torch threads.
    """

    def __init__(self, command: str):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # import roll as we do
        self.process = subprocess.Popen([sys.executable, "-c", command], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env, text=True, encoding="ascii")
        self.ready = False
        self.job: tuple[int, object] | None = None
        self.since = time.perf_counter()  # when it was started, or when its current job was sent

    def fileno(self) -> int:
        """For `multiprocessing.connection.wait`, which polls anything with a fileno (select() would
        fail on descriptors above 1024, common in a process that holds a model and its data)."""
        return self.process.stdout.fileno()

    def send(self, job: tuple[int, object]) -> None:
        self.job, self.since = job, time.perf_counter()
        self.process.stdin.write(json.dumps(job[1]) + "\n")  # ASCII JSON: escapes keep it one line
        self.process.stdin.flush()

    def receive(self):
        """The next message; only called when readable. One request at a time, so one line is waiting. A line
        that is not JSON (the job's code wrote to the protocol's descriptor) counts as the worker dying."""
        line = self.process.stdout.readline()
        if not line:
            raise EOFError
        try:
            return json.loads(line)
        except ValueError:
            raise EOFError from None

    def exit_code(self) -> int | None:
        try:
            return self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, kill: bool = False) -> None:
        try:
            self.process.stdin.close()  # end of input: an idle worker exits by itself
        except OSError:
            pass
        try:
            self.process.wait(timeout=0 if kill else 2.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


def _stop_workers(workers: list) -> None:
    for worker in workers:
        worker.stop()
    workers.clear()


class WorkerPool:
    """`workers` processes running `command` (a `python -c` program that ends in `serve`), with a hard
    deadline of `timeout_s` per job; `name` says whose workers they are in start-up errors. Workers start on
    first use (or `start()`); use as a context manager, or `close()`, so they stop."""

    def __init__(self, command: str, timeout_s: float, workers: int, name: str):
        self.command, self.timeout_s, self.num_workers, self.name = command, timeout_s, workers, name
        self.workers: list[_Worker] = []
        self._lock = threading.Lock()  # one batch at a time; callers on several threads queue here
        self._finalizer = weakref.finalize(self, _stop_workers, self.workers)

    def close(self) -> None:
        with self._lock:
            _stop_workers(self.workers)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def start(self) -> None:
        """Start the workers and wait until each is ready: a worker that cannot start is one line now
        (RollError), before any job."""
        with self._lock:
            self._feed(collections.deque(), {}, until_ready=True)

    def run(self, jobs: list[tuple[int, object]]) -> dict[int, Outcome]:
        """Each job's (index, payload) → its Outcome, each within `timeout_s` of reaching a worker."""
        outcomes: dict[int, Outcome] = {}
        if jobs:
            with self._lock:
                self._feed(collections.deque(jobs), outcomes)
        return outcomes

    def _feed(self, jobs: collections.deque, outcomes: dict, until_ready: bool = False) -> None:
        """Feed jobs to idle workers; collect replies; kill and replace any worker past its deadline. Returns
        once every job has its outcome (a replacement worker may still be starting), or with `until_ready`
        once every worker is ready."""
        while len(self.workers) < self.num_workers:
            self.workers.append(_Worker(self.command))
        while jobs or any(w.job is not None or (until_ready and not w.ready) for w in self.workers):
            for slot, worker in enumerate(self.workers):
                if worker.ready and worker.job is None and jobs:
                    try:
                        worker.send(jobs[0])
                        jobs.popleft()
                    except OSError:  # it died while idle: a fresh worker takes the job next round
                        self._replace(slot)
            waiting = [w for w in self.workers if w.job is not None or not w.ready]
            wait_s = min(self._deadline(w) for w in waiting) - time.perf_counter()
            answered = multiprocessing.connection.wait(waiting, timeout=max(0.0, wait_s))
            for slot, worker in enumerate(self.workers):
                if worker in answered:
                    self._receive(slot, outcomes)
                elif worker in waiting and time.perf_counter() >= self._deadline(worker):
                    self._expire(slot, outcomes)

    def _deadline(self, worker: _Worker) -> float:
        return worker.since + (self.timeout_s if worker.ready else STARTUP_TIMEOUT_S)

    def _receive(self, slot: int, outcomes: dict) -> None:
        worker = self.workers[slot]
        try:
            message = worker.receive()
        except (EOFError, OSError) as died:  # the worker died (killed by the OS, crashed in C code, ...)
            code = worker.exit_code()
            if not worker.ready:
                _stop_workers(self.workers)
                raise RollError(f"{self.name} worker exited on start-up (exit code {code}); see its stderr") from died
            self._finish(worker, outcomes, None, f"worker died (exit code {code})")
            self._replace(slot)
            return
        if worker.ready:
            self._finish(worker, outcomes, message, "")
        elif message == "ready":
            worker.ready = True
        else:  # the worker says why it cannot start (a reward function that cannot be imported)
            _stop_workers(self.workers)
            raise RollError(str(message))

    def _expire(self, slot: int, outcomes: dict) -> None:
        worker = self.workers[slot]
        if not worker.ready:
            _stop_workers(self.workers)
            raise RollError(f"{self.name} worker did not start within {STARTUP_TIMEOUT_S:g} s")
        self._finish(worker, outcomes, None, f"timeout after {self.timeout_s:g} s")
        self._replace(slot)

    @staticmethod
    def _finish(worker: _Worker, outcomes: dict, reply, error: str) -> None:
        outcomes[worker.job[0]] = Outcome(reply, error, (time.perf_counter() - worker.since) * 1000.0)
        worker.job = None

    def _replace(self, slot: int) -> None:
        """Kill the worker in `slot` and start a fresh one; its state may be arbitrarily bad."""
        self.workers[slot].stop(kill=True)
        self.workers[slot] = _Worker(self.command)
