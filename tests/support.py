"""Types and constants shared by the tests (import as `tests.support`)."""

from __future__ import annotations

from dataclasses import dataclass

from adaptivellm.launch import ServerProcess

#: Names the session server answers to: checks that --served-model-name passes through.
SERVED_NAMES = ("tiny", "tiny-alias")
#: Context limit of the session server: checks that --max-model-len passes through.
MAX_MODEL_LEN = 1024


@dataclass(frozen=True)
class Server:
    """A running server under test."""

    base_url: str
    process: ServerProcess
    names: tuple[str, ...] = SERVED_NAMES
    max_model_len: int = MAX_MODEL_LEN

    @property
    def model(self) -> str:
        return self.names[0]

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/v1"
