"""AdaptiveLLM: a drop-in extension of `vllm serve`.

Importing this package must stay cheap and must never import vLLM or torch: the split-execution
client (`adaptivellm.split_client`) and the planner run on machines without them.
"""

__version__ = "0.1.0"

#: The vLLM release whose private APIs AdaptiveLLM was written against (see adaptivellm.compat).
VLLM_VERSION_REQUIRED = "0.32.0"
