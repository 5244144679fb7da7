"""Long-context tasks. Each builds prompts in one fixed format, used unchanged for every method."""
