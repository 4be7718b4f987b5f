"""Conveyor monitoring."""
