"""Conveyor evaluation."""
