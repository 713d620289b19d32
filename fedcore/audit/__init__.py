"""Empirical privacy audits: a lower bound on epsilon beside every formal one.

- :mod:`fedcore.audit.bound`: the one-run bound of Steinke, Nasr and Jagielski (NeurIPS 2023);
- :mod:`fedcore.audit.canaries`: DP-SGD with white-box gradient canaries;
- :mod:`fedcore.audit.run`: the audit of a configuration and its positive control.
"""

from fedcore.audit.bound import epsilon_lower_bound, p_value

__all__ = ["epsilon_lower_bound", "p_value"]
