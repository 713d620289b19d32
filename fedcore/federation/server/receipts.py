"""What the federation has seen each site spend: receipts that outlive a site's own files.

Theory of operation (issue 20, "a site's budget survives the loss or restore of its own files").
A site's record-level ledger is its own file. Deleting it, or putting back a backup of it together
with its seal, starts the site's budget again, and the ledger's own checks cannot see a rollback of
both (:mod:`fedcore.privacy.ledger_files`). The federation is a second witness: every reply in
which a site reports its spend (``site_epsilon`` and ``site_charges``, its ledger's entry count:
after that round's charge, or as it stands when it declines) is a *receipt*. An intact ledger only
grows: each new training answer adds one entry, and its epsilon never decreases (composition only
adds privacy loss). So the invariant kept here, per site (at one delta):

- a training answer for a round the federation has not seen the site answer before must report
  *more* entries than the last receipt (it was charged once more), a re-sent answer (the same run
  and round, as after a resume) or a decline at least as many;
- no answer may report a smaller epsilon than the last receipt.

A ledger deleted, or restored from a backup even one round old, fails the first rule at its next
answer (counting alone would not do: an epsilon-only check passes a one-round-old backup, whose
next charge lands exactly on the receipt). Such a reply becomes an error reply for that site (the
round goes on with the others; under secure aggregation the site counts as dropped at the
masked-input stage, so its input never enters the sum), and the site stays refused (``behind``)
until an operator removes it from the receipts file: its fresh ledger would otherwise catch up with
the receipt while its true spend is about the sum of both. The check sits at the Grid
(:class:`ReceiptGrid`), below every round, so no round code can forget it.

Where receipts live: ``<dp.server.state_dir>/receipts.json`` when that is set (kept across runs,
like the federation ledger), else ``<run record>/receipts.json`` (the run and its resumes). The
file is owner-only (mode 0600: it says which sites took part) and is written after every exchange
that changed it, before the round's result is used.

Not covered: a site that loses its files before it ever reported; a receipts file lost or rolled
back with the site's; runs without ``dp.server.state_dir`` (each starts without receipts: the
summary says so); a new delta (receipts are kept per delta, not compared across). A site that
reports more than it spent only refuses itself sooner. Sites that report no ``site_charges``
(older versions) are held to the epsilon rule only.

Hand-written: no library keeps a second witness of a DP ledger.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.common import Error, Message

from fedcore._files import atomic_write, json_bytes, read_private
from fedcore.errors import LedgerLostError
from fedcore.federation import messages as m

if TYPE_CHECKING:
    from fedcore.protections import Protections

FORMAT = "fedcore.federation.receipts/1"
FILE = "receipts.json"
BEHIND_CODE = 4711  # the error code of a reply refused for a ledger behind its receipt
_TOLERANCE = 1e-9  # relative: the same ledger recomputed can differ in the last bits


@dataclass(frozen=True, slots=True)
class Spend:
    """One reply's report: the site, its ledger's epsilon and entry count (None: not reported),
    whether it declined, and the run and round it answered (None: not known)."""

    site: int
    epsilon: float
    charges: int | None
    declined: bool
    answered: str | None


@dataclass(slots=True)
class Receipts:
    """Per site id, the last receipt at ``delta`` (``{"epsilon", "charges", "answered"}``), and the
    sites refused for a ledger behind it (site id -> why). Mutable: :meth:`note` updates it."""

    path: Path
    delta: float
    last: dict[int, dict[str, Any]] = field(default_factory=dict)
    behind: dict[int, str] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: Path, *, delta: float) -> Receipts:
        """The receipts in ``folder`` (none yet: empty). Raises LedgerLostError for a file that
        does not parse: a federation that cannot read its receipts must not forget them."""
        path = folder / FILE
        if not path.exists():
            return cls(path=path, delta=delta)
        try:
            doc = json.loads(read_private(path))
            if doc.get("format") != FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT!r}")
            by_delta = doc["sites"].get(repr(float(delta)), {})
            last = {int(k): _receipt(v) for k, v in by_delta.items()}
            behind = {int(k): str(v) for k, v in doc["behind"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LedgerLostError(
                f"the federation's receipts {str(path)!r} cannot be read ({exc}); they record what "
                "every site was seen to spend: restore them, or remove the file deliberately"
            ) from None
        return cls(path=path, delta=delta, last=last, behind=behind)

    def refusal(self, spend: Spend) -> str | None:
        """Why ``spend`` is refused (its site's ledger is behind the last receipt), or None."""
        if spend.site in self.behind:
            return self.behind[spend.site]
        seen = self.last.get(spend.site)
        if seen is None:
            return None
        fresh = not spend.declined and (
            spend.answered is None or spend.answered != seen["answered"]
        )
        need = None if seen["charges"] is None else seen["charges"] + (1 if fresh else 0)
        low_eps = spend.epsilon < seen["epsilon"] * (1 - _TOLERANCE) - _TOLERANCE
        few = need is not None and spend.charges is not None and spend.charges < need
        if not (low_eps or few):
            return None
        return (
            f"site {spend.site}'s record-level ledger is behind what the federation saw it spend "
            f"(it reports epsilon {spend.epsilon:.6g} over {spend.charges} entries; the last "
            f"receipt is {seen['epsilon']:.6g} over {seen['charges']} entries, at delta "
            f"{self.delta:g}): its ledger was lost or restored from a backup; the site is refused "
            f"until an operator clears it from {str(self.path)!r}"
        )

    def note(self, spends: Iterable[Spend]) -> dict[int, str]:
        """Take the reports of one exchange; return the refused ones (site -> why) and save the
        file if anything changed."""
        refused: dict[int, str] = {}
        changed = False
        for spend in spends:
            why = self.refusal(spend)
            if why is not None:
                refused[spend.site] = why
                changed |= spend.site not in self.behind
                self.behind[spend.site] = why
                continue
            seen = self.last.get(spend.site, {})
            receipt = {
                "epsilon": max(spend.epsilon, seen.get("epsilon", spend.epsilon)),
                "charges": spend.charges,
                "answered": seen.get("answered") if spend.declined else spend.answered,
            }
            if receipt != seen:
                self.last[spend.site] = receipt
                changed = True
        if changed:
            self.save()
        return refused

    def save(self) -> None:
        """Write the file (atomically, owner-only), keeping other deltas' receipts."""
        sites: dict[str, Any] = {}
        if self.path.exists():
            try:
                sites = json.loads(read_private(self.path)).get("sites", {})
            except (OSError, ValueError, AttributeError):
                sites = {}
        sites[repr(float(self.delta))] = {str(k): v for k, v in sorted(self.last.items())}
        doc = {
            "format": FORMAT,
            "sites": sites,
            "behind": {str(k): v for k, v in sorted(self.behind.items())},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json_bytes(doc))


def _receipt(value: Any) -> dict[str, Any]:
    charges, answered = value["charges"], value["answered"]
    return {
        "epsilon": float(value["epsilon"]),
        "charges": None if charges is None else int(charges),
        "answered": None if answered is None else str(answered),
    }


def spend_of(reply: Message, instruction: Message | None) -> Spend | None:
    """What ``reply`` reports about its site's ledger (None: nothing), with the run and round of
    the ``instruction`` it answers."""
    reported = m.site_epsilon(reply)
    if reported is None:
        return None
    answered = None
    config = None if instruction is None else instruction.content.config_records.get(m.CONFIG)
    if config is not None and "server-round" in config:
        answered = f"{config.get(m.RUN_ID, '')}:{config['server-round']}"
    return Spend(
        site=reported[0],
        epsilon=reported[1],
        charges=m.site_charges(reply),
        declined=m.declined_reason(reply) is not None,
        answered=answered,
    )


class ReceiptGrid:
    """A Grid whose replies pass :class:`Receipts` first: a reply from a site whose ledger is
    behind its receipt comes back as an error reply with the reason, every other one as sent."""

    def __init__(self, grid: Any, receipts: Receipts) -> None:
        self.grid = grid
        self.receipts = receipts

    def __getattr__(self, name: str) -> Any:  # get_node_ids, run, set_run, ... pass through
        return getattr(self.grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        outgoing = list(messages)
        replies = list(self.grid.send_and_receive(outgoing, timeout=timeout))
        sent = {msg.metadata.dst_node_id: msg for msg in outgoing}  # one message per node
        spends = {
            i: spend
            for i, reply in enumerate(replies)
            if (spend := spend_of(reply, sent.get(reply.metadata.src_node_id))) is not None
        }
        refused = self.receipts.note(spends.values())
        for i, spend in spends.items():
            instruction = sent.get(replies[i].metadata.src_node_id)
            if spend.site in refused and instruction is not None:
                error = Error(code=BEHIND_CODE, reason=refused[spend.site])
                replies[i] = Message(error, reply_to=instruction)
        return replies


def guard(grid: Any, protections: Protections, *, record_dir: Path) -> Any:
    """``grid`` behind the run's receipts (``grid`` itself when record-level DP is off: sites
    report no spend)."""
    folder = protections.receipts_folder(record_dir)
    if protections.record is None or folder is None:
        return grid
    return ReceiptGrid(grid, Receipts.open(folder, delta=protections.record.delta))
