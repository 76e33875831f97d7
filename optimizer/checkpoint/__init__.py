"""Checkpoint I/O: safe loading of LDM single files, .ckpt and diffusers folders; atomic saving."""
