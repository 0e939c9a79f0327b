"""Errors of the simulator: each names the problem, the field and what is allowed."""

from __future__ import annotations

from kvtier.errors import KvtierError


class HardwareError(KvtierError):
    """A hardware file or preset is missing, malformed or inconsistent."""


class WorkloadError(KvtierError):
    """A workload (trace file or generator settings) cannot be used."""


class CapacityError(KvtierError):
    """What the simulation asks for does not fit a memory tier."""
