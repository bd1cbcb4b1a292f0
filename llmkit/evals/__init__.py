"""Evaluation of a model in training or after it: classification, causal LM, prediction files."""
