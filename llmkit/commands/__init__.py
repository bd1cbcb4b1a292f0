"""The commands of `llmkit`: each one's logic in its own module, run as `main(args)` (or the function llmkit.cli's
table names) from its parsed options; llmkit.cli is the parser table, and `entry` how every entry point ends."""
