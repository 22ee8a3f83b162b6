"""Analyses passes share: intermediate activations on reference data, layer selection."""
