"""What a split costs this server in seconds, as `bench/split_host_cost.py` measured it.

The split planner prices a session by the FLOPs its server layers take. On a server whose
forward pass costs about the same whatever its rows (a CPU, or any GPU at small batch), that
is not what a split costs: a split row waits for its client's round trip, so it seldom shares
a pass with the requests served whole, and each of its tokens costs the API server a WebSocket
message and an input chunk. `PassCosts` is that cost model, read from split_host_cost.json
(`adaptivellm serve --split-cost-profile`), and `PassCosts.split_saves` says whether a split
at k takes less server time per token than one more request served whole.

No numpy here: the config that carries it (adaptivellm.split_config) is imported by the CLI.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adaptivellm.jsonfile import read_json

#: The whole mode's and the interior split's rows a pass must differ by this much for their
#: passes to tell the per-row cost of a layer from its fixed cost.
MIN_ROWS_APART = 0.5


@dataclass(frozen=True)
class PassCosts:
    """A decode pass costs `head_s` (the LM head, sampling, the pass's own overhead) plus, for
    each layer it runs, `layer_s` and `layer_row_s` per row it carries. The API server spends
    `whole_host_s` of CPU per token of a request served whole, and per token of a split session
    at k the `split_host` figure, linear between the measured k."""

    layers: int
    head_s: float
    layer_s: float
    layer_row_s: float
    whole_host_s: float
    #: (k, API-server CPU seconds per split token) of the measured splits, k ascending.
    split_host: tuple[tuple[int, float], ...]
    #: Where the figures come from (the profile's path and its command).
    source: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "split_host", tuple((int(k), float(s)) for k, s in self.split_host)
        )
        if self.layers < 1:
            raise ValueError(f"layers must be >= 1, got {self.layers}")
        for name in ("head_s", "layer_s", "layer_row_s", "whole_host_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value}")
        ks = [k for k, _ in self.split_host]
        if not ks or ks != sorted(set(ks)) or not all(0 < k <= self.layers for k in ks):
            raise ValueError(
                f"split_host needs measured k, ascending, in [1, {self.layers}]: got {ks}"
            )
        if not all(math.isfinite(s) and s >= 0 for _, s in self.split_host):
            raise ValueError(f"split_host's seconds must be numbers >= 0: {self.split_host}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PassCosts:
        """Back from `to_dict` (the form `--additional-config` carries)."""
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def split_host_s(self, layer: int) -> float:
        """API-server CPU seconds per token of a split at `layer` (the nearest measured k's
        figure outside their range)."""
        points = self.split_host
        if layer <= points[0][0]:
            return points[0][1]
        for (k0, s0), (k1, s1) in itertools.pairwise(points):
            if layer <= k1:
                return s0 + (s1 - s0) * (layer - k0) / (k1 - k0)
        return points[-1][1]

    def split_s(self, layer: int) -> float:
        """Server seconds per token of a session split at `layer` (> 0): a pass of its own
        over the layers it leaves the server, and its host cost."""
        per_layer = self.layer_s + self.layer_row_s
        return self.head_s + (self.layers - layer) * per_layer + self.split_host_s(layer)

    def whole_s(self, whole_rows: int) -> float:
        """Server seconds per token of one more request served whole, beside `whole_rows`
        others: a row more in their pass, or a pass of its own when there are none."""
        if whole_rows <= 0:
            own = self.head_s + self.layers * (self.layer_s + self.layer_row_s)
            return own + self.whole_host_s
        return self.layers * self.layer_row_s + self.whole_host_s

    def split_saves(self, layer: int, whole_rows: int) -> bool:
        """Whether a split at `layer` costs the server less time per token than serving the
        session whole beside `whole_rows` requests served whole."""
        return layer > 0 and self.split_s(layer) < self.whole_s(whole_rows)

    def break_even_layer(self, whole_rows: int) -> int | None:
        """The smallest k whose split saves server time beside `whole_rows` requests served
        whole; None when none does."""
        return next((k for k in range(1, self.layers + 1) if self.split_saves(k, whole_rows)), None)


def pass_costs_from_result(result: dict[str, Any], source: str = "") -> PassCosts:
    """The cost model of a split_host_cost.json result (its per-mode medians). A pass's time is
    the forward time per token times the output tokens per pass: the all-client split's (no
    layers) is the head; the whole mode's and an interior split's (N and N - k layers, at their
    rows a pass) give a layer's fixed time and its cost per row. ValueError when the result
    lacks a mode or a figure this needs."""
    try:
        summary = result["summary"]
        splits = sorted(int(m.split("@")[1]) for m in summary if m.startswith("split@"))
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:
        raise ValueError(f"not a split_host_cost.json result ({exc!r})") from None
    # The model's layer count: recorded by the benchmark since --model; before, the
    # all-client split's k, the largest it measured with its default --layers-at.
    layers = int(result.get("layers") or max(splits, default=0))
    interior = [k for k in splits if 0 < k < layers]
    if "whole" not in summary or layers not in splits or not interior:
        raise ValueError(
            "needs the whole mode, an all-client split and an interior one (run "
            "bench/split_host_cost.py with its default --layers-at); has "
            f"{sorted(summary)}"
        )

    def median(mode: str, key: str) -> float:
        try:
            value = float(summary[mode][key]["median"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{mode} has no median {key} ({exc!r})") from None
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{mode}'s median {key} is {value}")
        return value

    def pass_s(mode: str) -> float:
        return median(mode, "forward_ms_per_token") * median(mode, "output_tokens_per_pass") / 1e3

    k = interior[-1]
    head = pass_s(f"split@{layers}")
    rows_whole = median("whole", "output_tokens_per_pass")
    rows_split = median(f"split@{k}", "output_tokens_per_pass")
    if abs(rows_whole - rows_split) < MIN_ROWS_APART:
        raise ValueError(
            f"the whole mode's and split@{k}'s rows a pass ({rows_whole:g}, {rows_split:g}) "
            "are too close to tell a layer's per-row cost: measure at a higher --concurrency"
        )
    per_layer_whole = max(0.0, pass_s("whole") - head) / layers
    per_layer_split = max(0.0, pass_s(f"split@{k}") - head) / (layers - k)
    slope = max(0.0, (per_layer_whole - per_layer_split) / (rows_whole - rows_split))
    return PassCosts(
        layers=layers,
        head_s=head,
        layer_s=max(0.0, per_layer_split - slope * rows_split),
        layer_row_s=slope,
        whole_host_s=median("whole", "api_server_cpu_ms_per_token") / 1e3,
        split_host=tuple(
            (s, median(f"split@{s}", "api_server_cpu_ms_per_token") / 1e3) for s in splits if s > 0
        ),
        source=source,
    )


def load_pass_costs(path: str | Path) -> PassCosts:
    """`pass_costs_from_result` of the JSON file at `path`; ValueError naming the file when it
    is missing, unreadable, not JSON or not such a result."""
    path = Path(path)
    result = read_json(path, "the split cost profile")
    if not isinstance(result, dict):
        raise ValueError(f"the split cost profile {path} is not a split_host_cost.json result")
    try:
        return pass_costs_from_result(result, source=f"{path} ({result.get('command', '?')})")
    except ValueError as exc:
        raise ValueError(f"the split cost profile {path}: {exc}") from None
