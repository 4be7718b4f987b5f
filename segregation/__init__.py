"""Conveyor segregation."""
