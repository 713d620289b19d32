"""A stand-in for ``fedcore simulate`` in the experiment tests: writes a run record in no time.

    python fake_simulate.py CALLS_FILE [--audit] --out DIR --set key=value ...

Appends the run folder's name to CALLS_FILE (so a test can count runs), then writes
``history.jsonl`` (accuracy a function of the seed and epsilon, the epsilon spent growing per
round) and a ``summary.md`` status line, as ``fedcore simulate`` does. A seed of 99 makes it exit
1 after round 1, like a run that crashed. With ``--audit`` it stands in for ``fedcore audit``
instead and writes ``audit.json`` (lower bound a quarter of the budget, control 8.2).
"""

import json
import sys
from pathlib import Path

calls, args = Path(sys.argv[1]), sys.argv[2:]
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
    doc = {"epsilon_formal": eps, "epsilon_lower_bound": eps / 4, "control": {"epsilon_lower_bound": 8.2}}
    (out / "audit.json").write_text(json.dumps(doc))
    sys.exit(0)
rounds = int(settings.get("rounds", "20"))
seed = int(settings.get("seed", "0"))
site_eps = float(settings["dp.site.epsilon"]) if "dp.site.epsilon" in settings else None
server_eps = float(settings["dp.server.epsilon"]) if "dp.server.epsilon" in settings else None
with (out / "history.jsonl").open("w") as fh:
    for r in range(1, rounds + 1):
        row = {
            "round": r,
            "eval_accuracy": 0.5 + 0.1 * seed + 0.01 * r,
            "site_epsilon": {"0": site_eps * r / rounds, "1": site_eps * r / rounds / 2} if site_eps else {},
            "server_epsilon": server_eps * r / rounds if server_eps else None,
        }
        if server_eps and settings.get("secagg.enabled") == "true":
            row["server_epsilon_sample_known"] = 2 * server_eps * r / rounds
        fh.write(json.dumps(row) + "\n")
        if seed == 99:
            sys.exit(1)
(out / "summary.md").write_text("# run\n\n- **Status**: completed\n")
