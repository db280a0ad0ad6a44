"""The station's health, read from its events: slot health and parking, Prometheus metrics.

    slothealth.py  tell a bad slot (cable, hub port, bridge) from a bad board
    slotpark.py    slot health wired into a running station: flag, park, clear from anywhere
    metrics.py     Prometheus metrics on [metrics] listen; imported by its path, when
                   configured, so prometheus_client loads only then (not part of this face)
"""

from station.health.slothealth import SlotHealth
from station.health.slotpark import SlotGuard, slot_command

__all__ = ["SlotGuard", "SlotHealth", "slot_command"]
