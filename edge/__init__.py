"""Edge: compile distilled models per device, ship them to fleets, run them offline."""

__version__ = "0.1.0"
