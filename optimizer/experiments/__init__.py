"""Experiments on the embedded zoo: fixed candidates scored on held-out captions (see ``studies/`` and ``notebooks/``)."""
