"""`roll warm`: one process that has imported torch, transformers and duckdb once, forking a fresh child for
every `roll` command a shell script runs, so five stage commands do not pay five ~4.5 s imports.

Why: a stage run as its own process spends most of its start-up importing libraries (BENCHMARKS.md, "Stages
as separate processes"). A forked child shares the already-imported modules and nothing else: it gets the
command's own argv, working directory, environment and terminal (stdin, stdout and stderr are passed over
the socket as file descriptors) with its umask and resource limits, runs it exactly as a cold process would,
and its exit status becomes the
command's. The warm process runs the embedded model once, on one thread, to get past first-call costs, and
never starts a thread pool or touches CUDA, so every child starts from a clean torch (fork and OpenMP or
CUDA do not mix).

    roll warm --socket /tmp/roll.sock &        # once per shell or job
    export ROLL_WARM=/tmp/roll.sock            # every roll command from here on starts warm

A command starts cold instead, with one line on stderr, when the socket does not answer, or when roll's
source files, the Python executable or an import-time variable (OMP_*, HF_*, TORCH* …) differ from the warm
process's: a warm child must run exactly the code and settings a cold process would. If the command's
process is killed, its child is killed too (as SIGKILL: stages commit atomically, so nothing is
half-written); SIGINT, SIGTERM and SIGHUP sent to the command are passed on to the child, unless the
command was started ignoring them (`nohup`).

Unix only (sockets that pass file descriptors; tested on Linux); it serves its owner's commands (socket mode 0600).
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import signal
import socket
import struct
import sys
from contextlib import contextmanager
from pathlib import Path

from roll.errors import RollError

# environment variables that libraries read when they are imported, i.e. once, in the warm process
IMPORT_TIME_ENV = ("OMP_", "MKL_", "KMP_", "OPENBLAS_", "TORCH", "PYTORCH_", "CUDA_", "NCCL_", "HF_",
                   "TRANSFORMERS_", "TOKENIZERS_", "PYTHON", "LD_", "DUCKDB_")
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# per-process resource limits (ulimit -f, -v, -n, …) a cold process would inherit from its shell
RESOURCE_LIMITS = ("RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_CPU", "RLIMIT_DATA", "RLIMIT_FSIZE", "RLIMIT_NOFILE",
                   "RLIMIT_STACK")
HEADER = struct.Struct("!I")  # length of the JSON request that follows
STATUS = struct.Struct("!i")  # the child's exit status, sent back by the warm process


def fingerprint(env: dict) -> str:
    """What a warm child must share with a cold process: roll's source files (by path, size and mtime), the
    interpreter, and the import-time environment. Cheap: a stat per source file, no imports."""
    import importlib.util

    digest = hashlib.sha256(sys.executable.encode())
    for package in ("roll", "roll.stages", "roll.pipeline"):
        for location in importlib.util.find_spec(package).submodule_search_locations:
            for path in sorted(Path(location).glob("*.py")):
                stat = path.stat()
                digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    for key in sorted(k for k in env if k.startswith(IMPORT_TIME_ENV)):
        digest.update(f"{key}={env[key]}".encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ client
def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def resource_limits() -> dict[str, list[int]]:
    """This process's (soft, hard) resource limits by name: a warm child takes them on, as a cold one inherits."""
    import resource

    return {name: list(resource.getrlimit(getattr(resource, name))) for name in RESOURCE_LIMITS
            if hasattr(resource, name)}


def run_warm(socket_path: str, argv: list[str]) -> int | None:
    """Run one command in a child of the warm process; its exit status, or None to start cold instead."""
    env = dict(os.environ)
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": env, "fingerprint": fingerprint(env),
                          "umask": current_umask(), "limits": resource_limits()}).encode()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The handlers go in before connecting, and hold a signal until the child exists. (Blocking the signals
    # with pthread_sigmask is not enough: it holds them in this thread only, and a library's thread would
    # take one and end this process by default while its child runs on.)
    pending: list[int] = []
    forwarding = []  # not empty once the warm process has forked the child

    def forward(signum, frame):
        if forwarding:
            _send_signal(conn, signum)
        else:
            pending.append(signum)

    # a signal the command was started ignoring (SIGHUP under nohup, SIGINT of `cmd &` in a script) stays
    # ignored: it is not forwarded, so the child, which starts with the defaults, never sees it
    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS
                if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        conn.connect(socket_path)
        socket.send_fds(conn, [HEADER.pack(len(request)) + request], [0, 1, 2])
        answer = _recv_exactly(conn, 1)
    except OSError as exc:
        answer, reason = None, f"ROLL_WARM={socket_path} does not answer ({exc.strerror or exc})"
    if answer != b"+":  # refused: the reason follows
        if answer is not None:
            reason = conn.recv(4096).decode(errors="replace") if answer else "closed the connection"
            reason = f"the warm process at {socket_path} {reason}"
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in pending:  # what a cold process would have done with it (it ends here, as a rule)
            signal.raise_signal(signum)
        print(f"roll: note: {reason}; starting cold", file=sys.stderr)
        return None
    forwarding.append(True)
    while pending:
        _send_signal(conn, pending.pop(0))
    try:
        status = _recv_exactly(conn, STATUS.size)
    except OSError:
        status = b""
    if len(status) < STATUS.size:
        print(f"roll: error: the warm process at {socket_path} went away before the command ended", file=sys.stderr)
        return 1
    return STATUS.unpack(status)[0]


def _send_signal(conn: socket.socket, signum: int) -> None:
    try:
        conn.send(bytes([signum]))
    except OSError:
        pass  # the warm process is gone: the status read after says so


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


# ------------------------------------------------------------------------------------------ warm process
def preload() -> None:
    """Import what the stages import (the list comes from running every stage after it and noting what was
    still imported). Imports only: no model is built and no tensor op runs here."""
    import importlib
    import pkgutil

    for name in ("duckdb", "pandas", "pyarrow.compute", "pyarrow.dataset", "pyarrow.parquet", "rich.progress",
                 "rich._emoji_codes", "torch", "torch.optim", "torch.profiler", "transformers",
                 "transformers.activations", "transformers.models.gpt2.modeling_gpt2", "math_verify"):
        try:
            importlib.import_module(name)
        except ImportError:  # pandas and math-verify are optional here
            pass
    from transformers import (  # noqa: F401  (lazy names)
        AutoModelForCausalLM,
        AutoTokenizer,
        PreTrainedTokenizerFast,
    )

    for package in ("roll", "roll.stages"):
        for module in pkgutil.iter_modules(importlib.import_module(package).__path__):
            if f"{package}.{module.name}" != "roll.__main__":
                importlib.import_module(f"{package}.{module.name}")
    importlib.import_module("roll.pipeline.iterate")


def warm_up() -> None:
    """Sample, teacher-force, backpropagate and take an optimiser step once on the embedded model, on one
    thread, so that children start past the one-off costs a fresh process pays on its first model
    (transformers compiles ~200 regular expressions per load; torch initialises its kernels on first
    call). One thread: OpenMP (GNU libgomp)
    threads started here would not exist in a forked child, and it would hang waiting for them; with one
    thread none is started, and each child starts its own team at the thread count its settings give.
    (pyarrow's jemalloc starts a background thread on import; jemalloc is built to survive fork.)"""
    import torch

    from roll.policy import load_policy
    from roll.runs import default_model_dir
    from roll.sampling import completion_logprobs, sample_batch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # likewise the tokenizers library's thread pool: once used, every forked child would warn and go serial
    try:
        with environ(TOKENIZERS_PARALLELISM="false"):
            model, tokenizer = load_policy(default_model_dir(), to_train=True)
            prompts = [tokenizer("1+2=")["input_ids"], tokenizer("12+7=")["input_ids"]]
            samples = sample_batch(model, prompts, max_new_tokens=4, temperature=1.0, top_p=1.0,
                                   eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                   seeds=[0, 1, 2, 3], group_size=2)
            completions = [sample.token_ids or [tokenizer.eos_token_id] for sample in samples]
            model.train()
            logprobs, mask = completion_logprobs(model, [p for p in prompts for _ in range(2)], completions, 1.0)
            (logprobs * mask).sum().backward()
            torch.optim.AdamW(model.parameters(), lr=0.0).step()
    finally:
        torch.set_num_threads(threads)


@contextmanager
def environ(**values: str):
    """Set environment variables for the block, then restore each to what it was (or remove it)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value


def no_gpu():
    """Hide every GPU while importing and warming up. A plain `torch.cuda.is_available()` initialises the
    CUDA driver unless it may ask NVML instead, and a child forked after that cannot use CUDA at all
    ("Cannot re-initialize CUDA in forked subprocess": what the first version did on an H200, the call's
    origin not pinned down). With no visible device and the NVML check, every such call answers False without
    touching the driver; each child sets the command's own environment before its first CUDA call."""
    return environ(CUDA_VISIBLE_DEVICES="", PYTORCH_NVML_BASED_CUDA_CHECK="1")


def refuse_if_fork_is_poisoned() -> None:
    """Fork a probe child and ask torch whether CUDA would refuse to start in it: if something initialised
    CUDA in this process after all, stop with one line rather than fail inside every GPU command."""
    import torch

    pid = os.fork()
    if pid == 0:
        os._exit(3 if torch.cuda._is_in_bad_fork() else 0)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
        raise RollError("roll warm: CUDA was initialised while warming up, so forked commands could not use a "
                        "GPU; run the commands without ROLL_WARM")


def serve(socket_path: str, command, ready=None) -> None:
    """Accept commands on `socket_path` until SIGTERM or SIGINT; each runs in its own forked child, which calls
    `command()` (the CLI's entry point, passed in so that this module never imports the CLI) with the
    request's argv, environment and working directory in place."""
    import selectors

    own_fingerprint = fingerprint(dict(os.environ))  # before the imports, which set variables of their own
    before = dict(os.environ)
    with no_gpu():
        preload()
        warm_up()
    refuse_if_fork_is_poisoned()
    # what importing did to the environment (torch sets TORCHINDUCTOR_CACHE_DIR): a cold process has it too
    set_by_imports = {key: value for key, value in os.environ.items() if before.get(key) != value}
    gc.freeze()  # the imported objects stay out of the collector's scans: children share their pages longer
    # SIGCHLD wakes the loop through a socketpair so that finished children are reaped and reported at once
    wake_read, wake_write = socket.socketpair()
    wake_read.setblocking(False)
    wake_write.setblocking(False)
    signal.set_wakeup_fd(wake_write.fileno())
    signal.signal(signal.SIGCHLD, lambda *_: None)
    stopping = []  # before the socket exists: a SIGTERM as soon as it appears must still remove it
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.append(True))

    path = Path(socket_path)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)  # one user's commands only: a child runs with this process's rights
    listener.listen(64)

    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}  # pid → the connection its exit status goes back on
    if ready is not None:
        ready()
    try:
        while not stopping:
            for key, _ in selector.select():
                if key.fileobj is wake_read:
                    try:
                        wake_read.recv(4096)
                    except BlockingIOError:
                        pass
                    continue
                conn, _ = listener.accept()
                pid = _accept(conn, own_fingerprint, set_by_imports, (listener, wake_read, wake_write), command)
                if pid is not None:
                    children[pid] = conn
            _reap(children)
    finally:
        path.unlink(missing_ok=True)
        for pid in children:  # commands still running end with the warm process that ran them
            os.kill(pid, signal.SIGTERM)


def _within(limit: int, bound: int) -> bool:
    import resource

    return bound == resource.RLIM_INFINITY or (limit != resource.RLIM_INFINITY and limit <= bound)


def _reap(children: dict) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            code = os.waitstatus_to_exitcode(status)
            try:
                conn.sendall(STATUS.pack(code if code >= 0 else 128 - code))  # killed by a signal: the shell's 128+N
            except OSError:
                pass  # the command's process is gone already
            conn.close()


def _accept(conn: socket.socket, own_fingerprint: str, set_by_imports: dict, close_in_child, command) -> int | None:
    """Read one request; fork a child for it. Returns the child's pid, or None if the request was refused."""
    fds = []
    try:
        conn.settimeout(10)
        first, fds, _, _ = socket.recv_fds(conn, 65536, 3)
        if len(fds) != 3 or len(first) < HEADER.size:
            raise OSError("malformed request")
        size = HEADER.unpack(first[:HEADER.size])[0]
        body = first[HEADER.size:] + _recv_exactly(conn, size - len(first) + HEADER.size)
        request = json.loads(body)
        conn.settimeout(None)
        if request["fingerprint"] != own_fingerprint:
            conn.sendall(b"-" + b"runs other roll source files, Python or import-time settings (OMP_*, HF_*, ...)")
            raise ValueError("another fingerprint")
        own = resource_limits()
        raised = [name for name, (_, hard) in request["limits"].items()
                  if name in own and not _within(hard, own[name][1])]
        if raised:  # only root may raise a hard limit: the child could not take the command's on
            conn.sendall(b"-" + f"has a lower hard {raised[0].removeprefix('RLIMIT_')} limit".encode())
            raise ValueError("a hard limit above the warm process's")
    except (OSError, ValueError):
        conn.close()
        for fd in fds:
            os.close(fd)
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        for sock in close_in_child:
            sock.close()
        _child(conn, request, fds, set_by_imports, command)  # never returns
    for fd in fds:
        os.close(fd)
    conn.sendall(b"+")
    print(f"roll warm: pid {pid}: {' '.join(['roll', *request['argv'][1:]])}", file=sys.stderr, flush=True)
    return pid


def _child(conn: socket.socket, request: dict, fds: list[int], set_by_imports: dict, command) -> None:
    import threading

    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.setsid()  # its own process group: a signal for one command reaches no other
        # torch's thread pool is left corrupt by fork and rebuilt by the first thread that sets a thread count;
        # threads that start at once (transformers' loaders, autograd's) raced to rebuild it, and one got none
        # ("Invalid thread pool!", once in a CI run): rebuild it here, while this is the only thread
        import torch

        torch.set_num_threads(torch.get_num_threads())
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.umask(request["umask"])  # the command's, not the warm process's: files get the modes a cold one gives
        import resource

        for name, (soft, hard) in request["limits"].items():
            resource.setrlimit(getattr(resource, name), (soft, hard))
        os.environ.clear()
        os.environ.update({**set_by_imports, **request["env"]})
        sys.argv = request["argv"]

        def watch() -> None:
            """Signals the command's process forwards; its end (EOF) kills this child as if it were that process."""
            while True:
                try:
                    data = conn.recv(64)
                except OSError:
                    data = b""
                if not data:
                    os.kill(os.getpid(), signal.SIGKILL)
                for signum in data:
                    os.kill(os.getpid(), signum)

        threading.Thread(target=watch, daemon=True).start()
        command()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
