"""The commands of `llmkit` that do more than call one library function."""
