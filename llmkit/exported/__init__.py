"""The export's owner: an export folder opened once (opened: its kind, model folder, adapter, labels, the run's
records) and scored by the one scorer of its kind (scoring: classifier logits, label-word scores, token
log-probabilities and perplexity). The run's evaluation, eval, compare, quantize, explain, generate, the export
check and the Hub push all read exports through it."""
