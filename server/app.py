"""fedcore's ServerApp: a thin adapter that hands Flower's Grid to :func:`fedcore.federation.server.serve.run_server`.

The settings come from the run config (``fedcore simulate`` or ``flwr run`` put them there); the
run record goes to the ``out`` setting, or ``runs/<timestamp>`` under the working directory.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcore.config import from_run_config
from fedcore.errors import FedcoreError
from fedcore.federation.server.progress import RichReporter
from fedcore.federation.server.serve import run_server
from fedcore.federation.simulation.engine import run_finished
from fedcore.federation.simulation.ray_cleanup import stop_ray_on_exit
from fedcore.protections import protections_of
from fedcore.runrecord import default_out_dir

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    stop_ray_on_exit()  # under `flwr run` on a simulation SuperLink: `flwr stop` leaves no Ray process
    settings = from_run_config(context.run_config)
    try:
        publication = protections_of(settings).publication
    except FedcoreError:  # run_server refuses these settings with its own message
        publication = None
    reporter = RichReporter(publication=publication)
    try:
        run_server(grid, settings, settings.out or default_out_dir(), reporter=reporter)
    finally:
        reporter.close()
    run_finished()  # under `fedcore simulate`: the record is closed, the run may be stopped now
