"""The embedded default: a zoo of small SD1-topology text-to-image models trained on coloured digits."""
