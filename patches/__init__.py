"""AdaptiveLLM patches."""
