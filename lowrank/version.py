"""The version of lowrank, recorded in every plan, profile and report it writes."""

__version__ = "0.1.0"
