"""Data: sources and labels, classification and causal-LM examples, batching."""
