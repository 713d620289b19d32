"""The guard that takes a whole process tree down when the fedcore process that started it dies.

Why it exists. ``PR_SET_PDEATHSIG`` (``die_with_parent``) makes the kernel kill fedcore's *direct*
children when fedcore dies, even by SIGKILL, but not their children: Flower's daemons start
``flower-superexec``, which starts ``flwr-serverapp`` / ``flwr-clientapp``, each in a session of its
own. Those watch their parent's pid every 0.2 s and then raise SIGINT in themselves, and on a loaded
machine their own shutdown (a gRPC call to a SuperLink that is gone, a training step under way) took
more than 30 s: a ``fedcore deploy-local`` killed outright left processes running behind it.

How. A :class:`~fedcore.deploy.processes.ProcessSupervisor` with a ``mark`` (an environment variable
every process it starts, and every process those start, inherits) starts, with its first
``die_with_parent`` process, this module as a process of its own (``python -m
fedcore.deploy.reaper NAME VALUE``), in a new session, without the mark, its standard input the read
end of a pipe whose only write end the supervisor holds (a pipe's descriptors are not inherited by
the other children). The reaper blocks reading it. End of file comes when the supervisor closes it
after stopping everything itself, or when the kernel closes it because the supervising process
died, however it died. The reaper then freezes (SIGSTOP) and SIGKILLs every process carrying the
mark, scanning again until two scans in a row find none (a frozen process cannot start a child that
a later scan would miss), and exits. Nothing in the tree needs a clean exit at that point: fedcore's
own record is closed or resumable from its checkpoint, which is what a SIGKILL of fedcore means.

On Linux only (``/proc``); elsewhere the supervisor starts no reaper.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from fedcore.deploy.pids import ProcessId, freeze, marked

SWEEP_SECONDS = 30.0  # give up after this long (a process that survives SIGKILL is the kernel's)


def sweep(name: str, value: str, *, seconds: float = SWEEP_SECONDS) -> int:
    """SIGKILL every process whose environment holds ``name=value`` until two scans in a row find
    none; return how many were killed."""
    killed: set[ProcessId] = set()
    quiet = 0
    deadline = time.monotonic() + seconds
    while quiet < 2 and time.monotonic() < deadline:
        found = marked(name, value)
        if not found:
            quiet += 1
            time.sleep(0.05)
            continue
        quiet = 0
        freeze(found)
        for ident in found:
            ident.signal(signal.SIGKILL)
        killed |= found
        time.sleep(0.05)
    return len(killed)


def start(name: str, value: str) -> tuple[subprocess.Popen[bytes], int]:
    """Start a reaper for the mark ``name=value``; return it and the pipe's write end, which the
    caller keeps open for as long as the tree should live and closes (:func:`release`) after
    stopping it."""
    read_end, write_end = os.pipe()  # both non-inheritable: no other child holds the write end
    env = {k: v for k, v in os.environ.items() if k != name}
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "fedcore.deploy.reaper", name, value],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # a Ctrl-C at the terminal does not reach it
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return process, write_end


def release(process: subprocess.Popen[bytes], write_end: int, *, timeout: float = 10.0) -> None:
    """Close the pipe (the reaper sweeps, finds what the caller left, and exits) and reap it."""
    with contextlib.suppress(OSError):
        os.close(write_end)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main(argv: list[str]) -> int:
    name, value = argv
    with contextlib.suppress(OSError):
        while os.read(0, 4096):
            pass
    sweep(name, value)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only end of file ends it
    sys.exit(main(sys.argv[1:]))
