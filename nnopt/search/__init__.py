"""The automatic search: give a model, data and the accuracy drop allowed; get the best model within it."""
