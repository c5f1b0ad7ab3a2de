"""The embedded tiny model: a deterministic random-weight Llama plus a locally trained tokenizer.

No model can be downloaded on the machines this project runs on, so AdaptiveLLM builds its own:
a Llama-architecture checkpoint with seeded random weights (transformers' `LlamaConfig` +
`save_pretrained`) and a byte-level BPE tokenizer trained with `tokenizers` on a seeded synthetic
corpus, with a chat template. vLLM loads the result like any Hugging Face checkpoint.

A model lives in `<cache>/models/<name>-<spec hash>/` beside a manifest that records the spec and
the SHA-256 of every file; a missing or corrupt model is rebuilt. Builds hold a file lock so that
a test run and a server starting together do not race.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

#: Bump when the build recipe changes, so that cached models are rebuilt.
BUILDER_VERSION = 1
MANIFEST = "adaptivellm_model.json"
DEFAULT_MODEL_NAME = "adaptivellm-tiny-llama"

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# A small fixed vocabulary: the corpus made from it is identical on every machine, so the BPE
# merges (and therefore every token id) are too.
_WORDS = tuple(
    """
the of and to in is was for on that with as by at from his her they this which be are an
or had not but have it one all were we when there can more would their if has been will
out time so up about into what who them some could other than then now only its over new
model token cache memory block swap compute layer request server client batch queue
latency throughput prefill decode attention tenant priority fairness schedule preempt
hidden state vector tensor kernel thread core engine serve stream metric profile plan
water river mountain city market garden window letter story music paper light night
morning summer winter green blue red small large quick slow early late happy quiet walk
read write build carry open close begin finish learn teach travel answer question
""".split()
)


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a generated Llama model. The defaults are the embedded default model."""

    num_layers: int = 6
    """Decoder layers."""
    hidden_size: int = 256
    """Width of the residual stream."""
    num_heads: int = 4
    """Attention heads; head_dim = hidden_size / num_heads (vLLM's CPU attention needs >= 32)."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention when smaller than num_heads)."""
    intermediate_size: int = 1024
    """Width of the MLP."""
    vocab_size: int = 4096
    """Tokenizer and embedding size, special tokens included."""
    max_position_embeddings: int = 4096
    """Longest context the model accepts."""
    seed: int = 0
    """Seed of the weights and of the tokenizer corpus."""
    initializer_range: float = 0.15
    """Std of the random weights: larger than Llama's 0.02 so that the next-token distribution is
    peaked and greedy decoding is not decided by float rounding between near-equal logits."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                f"({self.num_heads})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim < 32:
            raise ValueError(f"head_dim = {self.head_dim}: vLLM's CPU attention needs >= 32")
        if self.vocab_size < 512:
            raise ValueError(f"vocab_size must be >= 512 (byte alphabet), got {self.vocab_size}")
        if self.intermediate_size < 1 or self.max_position_embeddings < 16:
            raise ValueError("intermediate_size must be >= 1 and max_position_embeddings >= 16")
        if not self.initializer_range > 0:
            raise ValueError("initializer_range must be > 0")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    def key(self) -> str:
        """Short stable hash of the spec and builder version: the cache folder suffix."""
        blob = json.dumps([BUILDER_VERSION, dataclasses.asdict(self)], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """`$ADAPTIVELLM_CACHE`, else `$XDG_CACHE_HOME/adaptivellm`, else `~/.cache/adaptivellm`."""
    if env := os.environ.get("ADAPTIVELLM_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "adaptivellm"


def model_dir(spec: ModelSpec, name: str = DEFAULT_MODEL_NAME, cache: Path | None = None) -> Path:
    """Where the model of this spec lives in the cache."""
    return (cache or default_cache_dir()) / "models" / f"{name}-{spec.key()}"


def ensure_model(
    spec: ModelSpec | None = None,
    name: str = DEFAULT_MODEL_NAME,
    cache: Path | None = None,
) -> Path:
    """Return the folder of a valid model of this spec, building it if missing or corrupt."""
    spec = spec or ModelSpec()
    target = model_dir(spec, name, cache)
    if verify_model(target, spec):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target.parent / f".{target.name}.lock"):
        if verify_model(target, spec):  # another process built it while we waited
            return target
        if target.exists():
            logger.warning("Model at %s is incomplete or corrupt; rebuilding it", target)
        build_model(spec, target)
    return target


def build_model(spec: ModelSpec, out: Path) -> Path:
    """Build the model into `out` (replaced atomically), write its manifest, and return `out`."""
    logger.info("Building %s model (%s) in %s", DEFAULT_MODEL_NAME, _describe(spec), out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _save_tokenizer(spec, tmp)
        _save_weights(spec, tmp)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "builder_version": BUILDER_VERSION,
            "spec": dataclasses.asdict(spec),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def verify_model(path: Path, spec: ModelSpec | None = None) -> bool:
    """True when `path` holds a complete model whose files match its manifest (and `spec`)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("builder_version") != BUILDER_VERSION:
            return False
        if spec is not None and manifest.get("spec") != dataclasses.asdict(spec):
            return False
        files: dict[str, str] = manifest["files"]
        return bool(files) and all(_sha256(path / n) == h for n, h in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _describe(spec: ModelSpec) -> str:
    return (
        f"{spec.num_layers} layers, hidden {spec.hidden_size}, {spec.num_heads} heads, "
        f"{spec.num_kv_heads} kv heads, vocab {spec.vocab_size}"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def synthetic_corpus(seed: int, lines: int = 4000) -> list[str]:
    """Seeded pseudo-English sentences: the tokenizer's training text."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        sentence = " ".join(words)
        out.append(sentence[0].upper() + sentence[1:] + rng.choice(".!?,;:"))
    return out


def _save_tokenizer(spec: ModelSpec, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(spec.seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
        model_max_length=spec.max_position_embeddings,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def _save_weights(spec: ModelSpec, out: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2).save_pretrained(str(out))
