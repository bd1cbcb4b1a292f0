"""A run's folder, owned by one package: `layout` (the name of every file a run leaves, and how its records are
read and written), `life` (new / overwrite / resume, the lock), `manifest` (what makes a checkpoint complete),
`checkpoints` (save, find, match, load) and `elastic` (a checkpoint continued on another number of ranks)."""
