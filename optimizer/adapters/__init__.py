"""Adapters applied on top of a (merged) checkpoint at render time: A1111 hypernetworks, LoRA."""
