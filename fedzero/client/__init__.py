"""A client's local training: one round = load the global shared state, train, return the update."""

from .local import LocalClient, TrainSettings

__all__ = ["LocalClient", "TrainSettings"]
