"""Conveyor preparation."""
