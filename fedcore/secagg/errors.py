"""The one error SecAgg adds to :mod:`fedcore.errors`."""

from __future__ import annotations

from fedcore.errors import ProtocolError


class TooFewSurvivors(ProtocolError):
    """Fewer than the threshold of clients remain to finish a stage; the round is aborted.

    Raised before any secret that the missing clients' absence would expose is revealed: the server
    checks the survivor counts before it asks anyone to unmask, and an honest client refuses to
    unmask for fewer than ``threshold`` survivors.
    """
