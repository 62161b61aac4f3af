"""Collective communication: the Communicator interface and its implementations."""

from moeport.collectives.base import Communicator, Handle, ReduceOp

__all__ = ["Communicator", "Handle", "ReduceOp"]
