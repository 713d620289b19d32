"""``fedcore ledger reset``: an operator's explicit, recorded reset of a privacy ledger that refuses
to open because it is missing or older than what its scope has released.

    fedcore ledger reset --state-dir DIR (--site N | --federation) --reason TEXT [--force]

A site's ledger is ``DIR/site-N.ledger.json`` (its ``state-dir``); the federation's is
``DIR/federation.ledger.json`` (``dp.server.state_dir``, or the run record in simulation). The
reset is an entry of the ledger itself, with the time, the reason and how many charges the seal
had recorded (:func:`fedcore.privacy.ledger.reset_ledger`). It spends nothing and restores nothing:
the operator states that what was lost is accounted for elsewhere, and the ledger keeps that word.
A ledger that opens (present, readable, and as new as its seal records) needs no reset: one is
refused unless ``--force`` says it is meant.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedcore.cli import counted, description_of
from fedcore.errors import ConfigError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "ledger",
        help="operator commands on privacy ledgers (reset a lost or rolled-back ledger)",
        description=description_of(__doc__),
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    reset = actions.add_parser(
        "reset",
        help="record an operator reset of a ledger that refuses to open",
        # Checked in run() (a ConfigError, exit 2), so argparse would show them as optional.
        usage=f"fedcore ledger reset {RESET_USAGE}",
    )
    reset.add_argument("--state-dir", metavar="DIR", help="the folder holding the ledger")
    which = reset.add_mutually_exclusive_group()
    which.add_argument("--site", metavar="N", help="a site's record-level ledger")
    which.add_argument("--federation", action="store_true", help="the federation's ledger")
    reset.add_argument("--reason", metavar="TEXT", help="why; recorded in the ledger")
    reset.add_argument(
        "--force", action="store_true", help="record the reset even though the ledger opens"
    )
    return parser


RESET_USAGE = "--state-dir DIR (--site N | --federation) --reason TEXT [--force]"


def ledger_path(state_dir: str, *, site: str | None, federation: bool) -> Path:
    """The ledger file the options name; ConfigError for a missing folder or choice."""
    from fedcore.federation.site.store import SiteStore

    if not state_dir:
        raise ConfigError("--state-dir is required")
    folder = Path(state_dir)
    if not folder.is_dir():
        raise ConfigError(f"--state-dir {state_dir!r} is not a folder")
    if federation:
        from fedcore.privacy.ledger import FEDERATION_LEDGER_FILE

        return folder / FEDERATION_LEDGER_FILE
    if site is None:
        raise ConfigError("give --site N or --federation")
    try:
        site_id = int(site)
    except ValueError:
        raise ConfigError(f"--site must be an integer, got {site!r}") from None
    return SiteStore(folder, site_id).ledger_path


def run(args: argparse.Namespace) -> int:
    if getattr(args, "action", None) != "reset":
        raise ConfigError(f"usage: fedcore ledger reset {RESET_USAGE}")
    from fedcore.privacy.ledger import reset_ledger

    path = ledger_path(args.state_dir, site=args.site, federation=args.federation)
    if not args.force and (charges := healthy_charges(path)) is not None:
        raise ConfigError(
            f"ledger {str(path)!r} opens ({counted(charges, 'charge')}, as its seal records): it "
            "needs no reset; --force records one anyway"
        )
    print(reset_ledger(path, reason=args.reason or ""))
    return 0


def healthy_charges(path: Path) -> int | None:
    """The number of charges of the ledger at ``path`` if it would open as it is (present,
    readable, and not older than its seal); None if it would refuse, so a reset is what it needs."""
    from fedcore.privacy.ledger import CorruptLedgerError, PrivacyLedger, read_seal

    if not path.exists():
        return None
    try:
        seal = read_seal(path)
        ledger = PrivacyLedger.load(path)
    except CorruptLedgerError:
        return None
    charges = len(ledger.entries)
    if seal is not None and (
        charges < seal["charges"]
        or (charges == seal["charges"] and ledger.to_json()["sha256"] != seal["ledger_sha256"])
    ):
        return None
    return charges
