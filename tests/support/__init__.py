"""Test support: the harness the integration, e2e and fault tests (and the benchmarks)
share. It lives beside the tests, not in an installed package."""
