"""Ray's processes end with the Flower simulation process that started them (``flwr stop``).

``flwr run`` against a simulation SuperLink starts one ``flwr-simulation`` process per run
(through ``flower-superexec``); it calls ``ray.init()``, which starts a local Ray cluster as its
descendants: ``gcs_server``, ``raylet``, the dashboard, two monitors, the workers that host the
ClientApps, and, started by the raylet, ``ray::DashboardAgent`` and ``ray::RuntimeEnvAgent``.
``flwr stop RUN_ID`` answers the process's next heartbeat with "stopped"; the process raises
SIGINT in itself and exits through ``flwr_exit``, which runs the exit handlers and then forces an
exit after 5 s, before Ray's own shutdown has run. Seen with Flower 1.41 and Ray 2.x: the raylet,
GCS and workers went, the two agents (whose environment no longer has ``FLWR_HOME``) were left to
init and lived on after the run, one pair per stopped run.

:func:`stop_ray_on_exit` registers a Flower exit handler (before the force-exit timer) that stops
every descendant of the simulation process by process id
(:func:`fedcore.deploy.processes.stop_descendants`). It runs on every exit of that process: a
stopped run, a failed one, and a completed one (where Ray has already shut down and it finds
whatever Ray left). ``fedcore simulate`` needs none of this: its supervisor stops the whole tree.

The same handler first closes the run record the ServerApp was writing
(:func:`fedcore.federation.server.serve.close_open_records`: status ``interrupted`` as of the last
checkpoint, resumable): the ServerApp runs in a thread of ``flwr-simulation`` that waits for
replies and never sees the exit, so without it the record of a stopped run stayed open.
"""

from __future__ import annotations

import threading

from fedcore.federation.server.exiting import in_simulation_process

_registered = threading.Event()


def stop_ray_on_exit() -> bool:
    """In ``flwr-simulation``, make its exit stop every process it started (Ray's); elsewhere do
    nothing. Returns whether the handler is registered. Registering twice is a no-op."""
    if not in_simulation_process():
        return False
    if not _registered.is_set():
        _registered.set()
        from flwr.supercore.exit import add_exit_handler

        add_exit_handler(_on_exit, run_before_force_exit=True)
    return True


def _on_exit() -> None:
    from fedcore.deploy.processes import stop_descendants
    from fedcore.federation.server.serve import close_open_records

    close_open_records()

    stop_descendants(grace=2.0)
