"""Workload generators: synthetic patterns now; transformer layers and models later."""
