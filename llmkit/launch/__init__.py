"""Launch decisions, made before any process group starts: the checks (preflight), the DeepSpeed / Accelerate
settings (parallel), the precision, the trackers."""
