"""wse-sim: a cycle-level simulator of wafer-scale engines serving transformer inference."""
__version__ = "0.1.0"
