"""Conveyor ingestion."""
