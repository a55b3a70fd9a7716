"""Measurement: the latency protocol and the CPU fingerprint (``latency``), and the evaluation of every variant
on the runtime it will run on, in one process (``evaluate``).
"""
