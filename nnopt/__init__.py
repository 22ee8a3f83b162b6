"""nnopt."""
