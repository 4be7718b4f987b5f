"""Conveyor's tests; a package so toy estimators import by dotted path in worker processes."""
