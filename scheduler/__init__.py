"""AdaptiveLLM scheduler."""
