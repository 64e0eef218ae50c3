"""Launch a script on several local processes for multi-process tests.

``run_distributed`` starts ``torchrun`` (``python -m torch.distributed.run``) or
``accelerate launch`` on this machine with a free rendezvous port, waits for it,
and turns a non-zero exit or a timeout into an ``AssertionError`` that carries
the command and both output streams, so a failing worker's traceback shows up
in the pytest report. On a CPU-only machine the workers should use the gloo
backend (``dist.init_process_group("gloo")``, or Accelerate, which forms a gloo
group on a machine without GPUs only when told ``cpu=True`` or
``ACCELERATE_USE_CPU=1``; otherwise every rank runs alone) and must call ``dist.destroy_process_group()`` before exiting: without it gloo
aborts at exit in a good share of runs and the test turns flaky.

``launch_command`` gives just the command line, for tests that need to talk
to the processes while they run (e.g. send one rank a signal).

Import it from a test module with::

    sys.path.insert(0, str(Path(__file__).parent))
    from multiproc import run_distributed
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["free_port", "launch_command", "run_distributed"]

# Keep the tail of long logs only: the failing rank's traceback is at the end.
_MAX_STREAM_CHARS = 20_000


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1.

    Another process could take it before the launcher binds it; the window is
    short enough for tests, and a clash fails loudly rather than silently.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(
    args: Sequence[str], nproc: int = 2, launcher: str = "torchrun", port: int | None = None
) -> list[str]:
    """The launcher command line for ``args`` (a script path or ``-m module``, then its arguments).

    ``launcher="torchrun"`` runs ``python -m torch.distributed.run``;
    ``launcher="accelerate"`` runs ``python -m accelerate.commands.launch``
    with ``--multi_gpu``, which Accelerate also accepts on a CPU-only machine
    (it then uses gloo), and every setting that would otherwise come from a
    user's Accelerate config file given explicitly.
    """
    port = free_port() if port is None else port
    if launcher == "torchrun":
        head = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "1",
            "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1",
            "--master_port", str(port),
        ]  # fmt: skip
    elif launcher == "accelerate":
        head = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes", str(nproc),
            "--num_machines", "1",
            "--mixed_precision", "no",
            "--dynamo_backend", "no",
            "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port),
        ]  # fmt: skip
    else:
        raise ValueError(f"launcher must be 'torchrun' or 'accelerate', got {launcher!r}")
    return [*head, *args]


def _tail(text: str | bytes | None) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    if len(text) > _MAX_STREAM_CHARS:
        return f"[... {len(text) - _MAX_STREAM_CHARS} chars cut ...]\n" + text[-_MAX_STREAM_CHARS:]
    return text


def run_distributed(
    args: Sequence[str],
    nproc: int = 2,
    timeout: float = 180,
    env: Mapping[str, str] | None = None,
    launcher: str = "torchrun",
    cwd: str | os.PathLike[str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``args`` on ``nproc`` local processes and return the finished launcher process.

    Args:
        args: what the launcher runs: a script path and its arguments, or
            ``["-m", "package.module", ...]``.
        nproc: number of processes (ranks).
        timeout: seconds before the launcher and its workers are stopped
            (SIGTERM, then SIGKILL) and an ``AssertionError`` raised.
        env: variables added to (overriding) this process's environment.
            ``OMP_NUM_THREADS=1`` is set unless given, so that ``nproc`` workers
            do not oversubscribe the cores, and ``PYTHONUNBUFFERED=1`` so that
            output up to a crash is kept.
        launcher: ``"torchrun"`` or ``"accelerate"`` (see :func:`launch_command`).
        cwd: working directory, default the current one.
        check: raise ``AssertionError`` with the command and its stdout/stderr
            when the exit status is not 0.

    Returns:
        ``subprocess.CompletedProcess`` with text ``stdout`` and ``stderr``.
    """
    cmd = launch_command(args, nproc=nproc, launcher=launcher)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    # Output goes to files, not pipes: a worker that outlives its launcher would
    # keep a pipe open and make reading it block forever.
    with (
        tempfile.TemporaryFile("w+", errors="replace") as out,
        tempfile.TemporaryFile("w+", errors="replace") as err,
    ):
        proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=out, stderr=err, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            _stop(proc)
            timed_out = True
        except BaseException:  # e.g. Ctrl-C in pytest: leave no workers behind
            _stop(proc)
            raise
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    command = subprocess.list2cmdline(cmd)
    streams = f"--- stdout ---\n{_tail(stdout)}\n--- stderr ---\n{_tail(stderr)}"
    if timed_out:
        raise AssertionError(f"{launcher} run timed out after {timeout} s: {command}\n{streams}")
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"{launcher} run exited with status {result.returncode}: {command}\n{streams}")
    return result


def _proc_stat(pid: int | str) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every process below ``pid`` (Linux /proc; empty elsewhere).

    The start time lets a later kill make sure the pid was not reused meanwhile.
    """
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _proc_stat(entry.name)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append((int(entry.name), fields[19]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def _stop(proc: subprocess.Popen, grace: float = 10) -> None:
    """Stop a launcher and its workers.

    torchrun (and accelerate launch, which runs it in-process) starts each
    worker in a session of its own, so killing the launcher's process group
    misses them. SIGTERM lets the launcher shut its workers down; whatever is
    left after ``grace`` seconds, launcher or worker, gets SIGKILL by pid.
    """
    workers = _descendants(proc.pid)
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid, started in workers:
        fields = _proc_stat(pid)
        if fields is not None and fields[19] == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
