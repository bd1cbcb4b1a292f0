"""Shipping a run: the verified export, the model card, the Hub."""
