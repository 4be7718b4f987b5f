"""Conveyor training."""
