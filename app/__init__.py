"""The HTTP process: OpenAI-compatible routes over the workers. Never imports torch."""
