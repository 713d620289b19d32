"""A stand-in for ``fedcore simulate`` in the experiment tests: writes a run record in no time.

    python fake_simulate.py CALLS_FILE [--audit] --out DIR --set key=value ...

Appends the run folder's name to CALLS_FILE (so a test can count runs), then writes
``history.jsonl`` (accuracy a function of the seed and epsilon, the epsilon spent growing per
round), with DP a ``privacy.json`` (the ledgers, their events as fedcore writes them) and a
``summary.md`` status line, as ``fedcore simulate`` does (with ``dp.distributed.epsilon``, the
federation ledger's distributed discrete Gaussian or Skellam charge and ``server_mechanism``). A seed of 99 makes it exit
1 after round 1, like a run that crashed. With ``--audit`` it stands in for ``fedcore audit``
instead and writes ``audit.json`` (lower bound a quarter of the budget, control 8.2).

Like ``fedcore simulate`` it prints a line per round with the training loss (always
:data:`TRAIN_LOSS`) and the sites that replied, and reports each round's sample count
(:data:`NUM_EXAMPLES`): in ``history.jsonl`` without DP, and with DP only in the owner-only
``operator.jsonl``, as the run record does.

``FAKE_SIMULATE_STOP=RUN_ID:HOW`` in the environment stops the run of point RUN_ID after round 1
as a signal would: ``HOW`` is an exit status (130, 143) or ``kill`` (SIGKILL to itself).
"""

import json
import os
import signal
import sys
from pathlib import Path

TRAIN_LOSS = 0.7071067  # markers a test looks for in every world-readable file
NUM_EXAMPLES = 31337
SITE_NOISE, SITE_RATE, SITE_STEPS = 1.2346, 0.0417, 24  # site 0's DP-SGD in privacy.json
SERVER_NOISE = 2.8197  # the federation's DP-FedAvg noise in privacy.json
# distributed DP's charge: noisers' shares of DIST_SHARE (sigma; mu = its square for Skellam) on
# a sum of L2 sensitivity DIST_L2, a noise multiplier of sqrt(4) * 3000 / 4000 = 1.5
DIST_L2, DIST_NOISERS, DIST_SHARE = 4000.0, 4, 3000.0


def main(argv: list[str]) -> None:
    calls, args = Path(argv[0]), argv[1:]
    out = Path(args[args.index("--out") + 1])
    settings = {}
    for j, item in enumerate(args):
        if item == "--set":
            key, _, value = args[j + 1].partition("=")
            settings[key] = value
    with calls.open("a") as fh:
        fh.write(out.name + "\n")
    out.mkdir(parents=True)
    if "--audit" in args:
        eps = float(settings["dp.site.epsilon"])
        doc = {
            "epsilon_formal": eps,
            "epsilon_lower_bound": eps / 4,
            "control": {"epsilon_lower_bound": 8.2},
        }
        (out / "audit.json").write_text(json.dumps(doc))
        sys.exit(0)
    rounds = int(settings.get("rounds", "20"))
    seed = int(settings.get("seed", "0"))
    site_eps = float(settings["dp.site.epsilon"]) if "dp.site.epsilon" in settings else None
    server_eps = float(settings["dp.server.epsilon"]) if "dp.server.epsilon" in settings else None
    distributed = "dp.distributed.epsilon" in settings
    if distributed:  # the federation ledger charges the sum, as under DP-FedAvg
        server_eps = float(settings["dp.distributed.epsilon"])
    stop_id, _, how = os.environ.get("FAKE_SIMULATE_STOP", "").partition(":")
    with (out / "history.jsonl").open("w") as fh:
        for r in range(1, rounds + 1):
            row = {
                "round": r,
                "eval_accuracy": 0.5 + 0.1 * seed + 0.01 * r,
                "site_epsilon": {"0": site_eps * r / rounds, "1": site_eps * r / rounds / 2}
                if site_eps
                else {},
                "server_epsilon": server_eps * r / rounds if server_eps else None,
            }
            if server_eps and settings.get("secagg.enabled") == "true" and not distributed:
                row["server_epsilon_sample_known"] = 2 * server_eps * r / rounds
            diagnostics = {"train_loss": TRAIN_LOSS, "num_examples": NUM_EXAMPLES}
            if server_eps or site_eps:  # withheld from the public record, as fedcore.runrecord does
                fd = os.open(out / "operator.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                with os.fdopen(fd, "a") as private:
                    private.write(json.dumps({"round": r, **diagnostics}) + "\n")
            else:
                row.update(diagnostics)
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            print(
                f"round {r:>3}/{rounds}  loss {TRAIN_LOSS:.4f}/0.5000  sites 3/3  {NUM_EXAMPLES} examples"
            )
            sys.stdout.flush()
            if seed == 99:
                sys.exit(1)
            if stop_id == out.name:
                if how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                sys.exit(int(how))
    _privacy_json(out, settings, rounds=rounds, site_eps=site_eps, server_eps=server_eps)
    (out / "summary.md").write_text("# run\n\n- **Status**: completed\n")


def _privacy_json(out, settings, *, rounds, site_eps, server_eps):  # noqa: ANN001, ANN202
    """``privacy.json`` as fedcore writes it: a ledger per site (site 0's epsilon the larger, its
    noise :data:`SITE_NOISE`, :data:`SITE_STEPS` DP-SGD steps a round at rate :data:`SITE_RATE`)
    and the federation's (:data:`SERVER_NOISE`, one charge a round, every site sampled)."""
    if not (site_eps or server_eps):
        return
    delta = float(settings.get("dp.site.delta" if site_eps else "dp.server.delta", "1e-05"))

    def ledger(eps, event, scale=1.0):  # noqa: ANN001, ANN202
        entries = [
            {"event": event, "round": r, "epsilon_after": eps * scale * r / rounds}
            for r in range(1, rounds + 1)
        ]
        return {"budget": {"epsilon": eps, "delta": delta}, "entries": entries}

    doc = {"site_budget": None, "server_budget": None, "sites": {}, "federation": None}
    if site_eps:
        doc["site_budget"] = {"epsilon": site_eps, "delta": delta}
        for site, (noise, scale) in {"0": (SITE_NOISE, 1.0), "1": (9.0, 0.5)}.items():
            event = {
                "kind": "poisson_subsampled_gaussian",
                "sampling_rate": SITE_RATE,
                "noise_multiplier": noise,
                "count": SITE_STEPS,
            }
            doc["sites"][site] = ledger(site_eps, event, scale)
    if server_eps and "dp.distributed.epsilon" in settings:
        doc["server_budget"] = {"epsilon": server_eps, "delta": 1e-05, "binds": "sample-known"}
        doc["server_mechanism"] = "distributed"
        event = {
            "kind": settings.get("dp.distributed.mechanism", "dgauss") == "skellam"
            and "skellam"
            or "distributed_discrete_gaussian",
            "l2_sensitivity": DIST_L2,
            "noisers": DIST_NOISERS,
            "dim": 16384,
            "count": 1,
        }
        event["mu" if event["kind"] == "skellam" else "sigma"] = (
            DIST_SHARE**2 if event["kind"] == "skellam" else DIST_SHARE
        )
        doc["federation"] = ledger(server_eps, event)
    elif server_eps:
        doc["server_budget"] = {"epsilon": server_eps, "delta": delta}
        gaussian = {
            "kind": "poisson_subsampled_gaussian",
            "sampling_rate": 1.0,
            "noise_multiplier": SERVER_NOISE,
            "count": 1,
        }
        skip = {"kind": "revealed_with_probability", "probability": 1e-9, "count": 1}
        doc["federation"] = ledger(server_eps, {"kind": "composed", "events": [gaussian, skip]})
    (out / "privacy.json").write_text(json.dumps(doc))


if __name__ == "__main__":
    main(sys.argv[1:])
