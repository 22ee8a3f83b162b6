"""nnopt IR: the model, graph views, and the constants, naming and walking helpers that passes share."""
