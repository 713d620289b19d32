"""Privacy from Python: the budget arithmetic of ``fedcore budget`` and the audit of ``fedcore audit``.

Both call the library functions their commands call: :func:`fedcore.privacy.accountant.epsilon`
and :func:`~fedcore.privacy.accountant.calibrate_noise_multiplier` over ``steps`` steps of the
Poisson-subsampled Gaussian (Abadi et al. 2016, with the accountants of dp-accounting: PLD,
Koskela et al. 2020, or RDP, Mironov 2017), and :func:`fedcore.audit.run.audit`, the one-run audit
of Steinke, Nasr and Jagielski (NeurIPS 2023).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from fedcore.config import Settings
from fedcore.errors import ConfigError

if TYPE_CHECKING:
    from fedcore.audit.run import AuditReport
    from fedcore.crypto.stream import CryptoRng


@dataclass(frozen=True, slots=True)
class Budget:
    """The privacy of ``steps`` steps of the Poisson-subsampled Gaussian at ``sample_rate``:
    ``epsilon`` at ``delta`` for ``noise_multiplier``, by ``accountant``."""

    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str


def budget(
    *,
    sample_rate: float,
    steps: int,
    delta: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    accountant: Literal["pld", "rdp"] = "pld",
) -> Budget:
    """The epsilon of a noise multiplier, or the smallest noise multiplier that meets a target
    epsilon (give exactly one of the two), as ``fedcore budget`` computes it::

        fedcore.budget(sample_rate=0.01, steps=1000, delta=1e-5, target_epsilon=2.0)

    Raises :class:`~fedcore.errors.ConfigError` for a value out of range, both or neither of
    ``noise_multiplier`` and ``target_epsilon``, an unknown accountant or an unreachable target.
    """
    from fedcore.privacy.accountant import calibrate_noise_multiplier, epsilon, parse_accountant
    from fedcore.privacy.events import PoissonSubsampledGaussian

    kind = parse_accountant(accountant)
    if noise_multiplier is not None and target_epsilon is None:
        noise = noise_multiplier
    elif target_epsilon is not None and noise_multiplier is None:
        noise = calibrate_noise_multiplier(
            target_epsilon=target_epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=kind,
        )
    else:
        raise ConfigError("give exactly one of noise_multiplier and target_epsilon")
    event = PoissonSubsampledGaussian(
        sampling_rate=sample_rate, noise_multiplier=noise, count=steps
    )
    return Budget(
        epsilon=epsilon(event, delta=delta, accountant=kind),
        delta=float(delta),
        noise_multiplier=float(noise),
        sample_rate=float(sample_rate),
        steps=int(steps),
        accountant=kind.value,
    )


def run_audit(
    settings: Settings, *, canaries: int | None = None, rng: CryptoRng | None = None
) -> AuditReport:
    """An empirical lower bound on the record-level epsilon of the DP-SGD that ``settings``
    configure (``dp.site.epsilon`` must be set), as ``fedcore audit`` computes it: site 0's
    DP-SGD with ``canaries`` white-box gradient canaries (default 30000), beside weakened
    controls that state the audit's power. In this process, no Flower. The report's
    ``epsilon_formal``, ``epsilon_lower_bound``, ``strong_enough`` and ``verdict`` say what was
    found; ``report.to_json()`` is ``audit.json``. ``rng``: a seeded
    :class:`~fedcore.crypto.stream.CryptoRng` for a repeatable audit (default: fresh from the OS).
    Raises :class:`ConfigError` (no record-level DP, a bad setting)."""
    from fedcore.audit.run import DEFAULT_CANARIES, audit

    if canaries is not None and (isinstance(canaries, bool) or not isinstance(canaries, int)):
        raise ConfigError(f"canaries must be an integer, got {canaries!r}")
    return audit(settings, canaries=DEFAULT_CANARIES if canaries is None else canaries, rng=rng)
