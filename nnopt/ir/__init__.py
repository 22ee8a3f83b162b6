"""nnopt IR."""
