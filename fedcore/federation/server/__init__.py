"""The server's half of a federation: the ServerApp's run (serve), the round drivers (plain,
DP-FedAvg, secure aggregation), the strategies, checkpoints and the progress line."""
