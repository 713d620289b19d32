"""The ServerApp makes Flower's simulation process stop Ray's processes on exit, and only there.
(The real `flwr stop` is exercised in tests/deploy/test_flwr_stop.py.)"""

from __future__ import annotations

import sys

from flwr.supercore.exit import exit_handler

from fedcore.federation.simulation import ray_cleanup


def test_registered_once_in_flwr_simulation_and_never_elsewhere(monkeypatch):
    monkeypatch.setattr(ray_cleanup, "_registered", type(ray_cleanup._registered)())
    monkeypatch.setattr(exit_handler, "registered_exit_handlers", [])
    monkeypatch.setattr(sys, "argv", ["/venv/bin/flwr-serverapp"])
    assert ray_cleanup.stop_ray_on_exit() is False
    assert exit_handler.registered_exit_handlers == []

    monkeypatch.setattr(sys, "argv", ["/venv/bin/flwr-simulation", "--token", "x"])
    assert ray_cleanup.stop_ray_on_exit() is True
    assert ray_cleanup.stop_ray_on_exit() is True
    (handler,) = exit_handler.registered_exit_handlers
    # Before Flower's force-exit timer (5 s), so it runs before the process can be cut short.
    assert handler.run_before_force_exit and handler.exit_handler is ray_cleanup._on_exit
