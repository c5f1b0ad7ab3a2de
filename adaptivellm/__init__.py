"""AdaptiveLLM: a drop-in extension of `vllm serve`.

Importing this package must stay cheap and must never import vLLM or torch: the split-execution
client (`adaptivellm.split_client`) and the planner run on machines without them.
"""

import logging

__version__ = "0.1.0"

#: The vLLM release whose private APIs AdaptiveLLM was written against (see adaptivellm.compat).
VLLM_VERSION_REQUIRED = "0.32.0"


def setup_logging() -> None:
    """AdaptiveLLM's log lines (logger `adaptivellm`) on stderr in vLLM's format, once."""
    root = logging.getLogger("adaptivellm")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s", "%m-%d %H:%M:%S")
        )
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
