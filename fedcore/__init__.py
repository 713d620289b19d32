"""fedcore: privacy-preserving federated learning for data-center sites, on Flower.

Record-level DP-SGD at each site (Opacus), secure aggregation (SecAgg+), and site-level DP on the
aggregate, all accounted in one privacy ledger.
"""

__version__ = "0.1.0"
