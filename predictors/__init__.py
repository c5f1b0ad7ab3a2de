"""AdaptiveLLM predictors."""
