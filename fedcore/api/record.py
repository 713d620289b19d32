"""A finished (or stopped) run's record folder, read as an object: what ``fedcore.simulate`` returns.

The folder is the one :mod:`fedcore.runrecord` writes (``config.json``, ``history.jsonl``,
``status.json``, ``privacy.json`` with DP on, ``model.pt``, ``summary.md``, the plots). This
reader never writes to it, and reads the files each time a property is asked for, so a record
still being written shows its rounds so far. It reads the public files only: ``operator.jsonl``
(the diagnostics the privacy guarantee does not cover) is not read.

(:class:`fedcore.runrecord.RecordWriter` is the record's writer, used by the server; this class
is its read-only view for users.)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcore.config import Settings
from fedcore.errors import ConfigError


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


@dataclass(frozen=True, slots=True)
class RunRecord:
    """The run record in ``path``, read-only. ``RunRecord("runs/20260101-120000")`` opens one.

    Raises :class:`~fedcore.errors.ConfigError` if ``path`` holds no run record (no
    ``config.json`` or ``history.jsonl``).
    """

    path: Path

    def __init__(self, path: str | os.PathLike[str]) -> None:
        folder = Path(path)
        for name in ("config.json", "history.jsonl"):
            if not (folder / name).is_file():
                raise ConfigError(f"{str(folder)!r} holds no run record (no {name})")
        object.__setattr__(self, "path", folder)

    def _json(self, name: str) -> Any:
        try:
            return json.loads((self.path / name).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{str(self.path / name)!r} cannot be read: {exc}") from exc

    @property
    def config(self) -> dict[str, Any]:
        """``config.json``: the settings as run, versions, start time, the run's id."""
        return dict(self._json("config.json"))

    @property
    def settings(self) -> Settings:
        """The settings the run used, as :class:`~fedcore.config.Settings`."""
        from fedcore import config as cfg

        return cfg.resolve(values=self.config["settings"])

    @property
    def history(self) -> tuple[dict[str, Any], ...]:
        """One dict per completed round (``history.jsonl``): ``round``, ``eval_accuracy``,
        ``eval_loss``, ``sites_replied``, the round's epsilons, ... (NaN written as None)."""
        lines = (self.path / "history.jsonl").read_text().splitlines()
        return tuple(json.loads(line) for line in lines if line.strip())

    @property
    def rounds_completed(self) -> int:
        return len(self.history)

    @property
    def status(self) -> str | None:
        """How the run ended: ``completed``, ``stopped`` (a budget spent), ``failed`` or
        ``interrupted``; None while it runs (no ``status.json`` yet)."""
        doc = self._json("status.json")
        return doc.get("status") if isinstance(doc, dict) else None

    @property
    def reason(self) -> str:
        """Why it ended so (empty when it completed)."""
        doc = self._json("status.json")
        return str(doc.get("reason", "")) if isinstance(doc, dict) else ""

    @property
    def accuracies(self) -> tuple[float | None, ...]:
        """The central held-out accuracy after each completed round."""
        return tuple(_finite(row.get("eval_accuracy")) for row in self.history)

    @property
    def final_accuracy(self) -> float | None:
        """The held-out accuracy of the last completed round (None before round 1)."""
        accuracies = self.accuracies
        return accuracies[-1] if accuracies else None

    @property
    def privacy(self) -> dict[str, Any] | None:
        """``privacy.json`` (budgets, ledgers, every round's epsilons); None without DP."""
        return self._json("privacy.json")

    @property
    def record_epsilon(self) -> float | None:
        """Record-level DP-SGD: the largest epsilon any site has spent (None without it)."""
        spent = [
            eps
            for row in self.history
            if isinstance(row.get("site_epsilon"), dict)
            for eps in map(_finite, row["site_epsilon"].values())
            if eps is not None
        ]
        return max(spent) if spent else None

    @property
    def server_epsilon(self) -> float | None:
        """Site-level DP (DP-FedAvg): the federation's epsilon after the last round that has one."""
        spent = [_finite(row.get("server_epsilon")) for row in self.history]
        present = [eps for eps in spent if eps is not None]
        return present[-1] if present else None

    @property
    def model_path(self) -> Path | None:
        """``model.pt``, the final global model's ``state_dict`` (None if not written)."""
        path = self.path / "model.pt"
        return path if path.is_file() else None

    @property
    def summary(self) -> str:
        """``summary.md`` as text (empty if not written)."""
        path = self.path / "summary.md"
        return path.read_text() if path.is_file() else ""

    @property
    def plots(self) -> tuple[Path, ...]:
        """The record's plots (``accuracy.png``, and ``privacy.png`` with DP on)."""
        return tuple(sorted(self.path.glob("*.png")))

    def load_model(self):  # noqa: ANN201 - a torch.nn.Module (torch imported only here)
        """The final global model, built as the run built it, with ``model.pt``'s weights.
        Loads the data's shape once (as a site does). Raises :class:`ConfigError` if the record
        has no model, or its model cannot be built here (a user model that does not import)."""
        import torch

        from fedcore.data import load_holdout
        from fedcore.federation.site.data import data_settings
        from fedcore.models import build_model

        if self.model_path is None:
            raise ConfigError(f"{str(self.path)!r} has no model.pt (no round completed?)")
        settings = self.settings
        _, input_shape, num_classes = load_holdout(data_settings(settings))
        model = build_model(settings.model, input_shape=input_shape, num_classes=num_classes)
        model.load_state_dict(torch.load(self.model_path, weights_only=True))
        return model

    def __repr__(self) -> str:
        accuracy = self.final_accuracy
        shown = "none" if accuracy is None else f"{accuracy:.4f}"
        return (
            f"RunRecord({str(self.path)!r}: {self.status or 'running'}, "
            f"{self.rounds_completed} rounds, final accuracy {shown})"
        )
