"""Tiny, real-topology models of every architecture, built with diffusers' own classes: for tests,
benchmarks and demos (like ``optuna.testing``). Never imported by the runtime."""
