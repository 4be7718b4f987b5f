"""Conveyor scoring."""
