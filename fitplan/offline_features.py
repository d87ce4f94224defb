"""The disk and generation time of an offline Eagle3 run's features (docs/estimate.md, "Offline features").

SpecForge's offline runs first write the target's hidden states for every training sample
(`scripts/prepare_hidden_states.py`): one `torch.save` file per sample (`.ckpt`, uncompressed
unless `--compress`) holding four tensors, each of the sample's stored length N:
`aux_hidden_state` [1, N, 3h] and `hidden_state` [1, N, h] in the target's dtype (bf16), and
`input_ids` and `loss_mask` [N] as int64. N is not the sample's own length: the script feeds
the target padded batches (`--batch-size`, 32 by default, in dataset order) and stores each
padded row whole, so every sample of a batch is stored at the batch's longest length, at most
`--max-length`. Users have filled 740 GB to tens of TB this way without warning.

The lengths come from `--samples N` (every sample at the job's seq: an upper bound) or from a
conversation JSONL whose token counts are estimated here (UTF-8 bytes / 4 per message plus
chat-template tokens: an approximation) or counted with a local tokenizer.json. The generation
time is a model: the target's prefill FLOPs over the stored tokens at an assumed efficiency.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fitplan.errors import FitplanError
from fitplan.shapes import ModelShape, weight_bytes
from fitplan.units import BF16

AUX_LAYERS = 3  # the Eagle3 draft reads three target layers, stored side by side ([N, 3h])
ID_BYTES = 8  # input_ids and loss_mask are int64
# torch.save's zip container per file (its pickle, version and byte-order records and the
# 64-byte alignment of each tensor): 2,205-2,317 B measured for such a record at N from 1 to
# 4096 and h 64 and 4096 (torch 2.13); the upper figure.
FILE_OVERHEAD_BYTES = 2317
PREPARE_BATCH_SIZE = 32  # prepare_hidden_states.py --batch-size default
# Chat-template tokens around each message (role header and end-of-turn markers: 4-6 tokens in
# the Llama 3 and Qwen templates). Assumed, not read from a template.
TEMPLATE_TOKENS_PER_MESSAGE = 5
BYTES_PER_TOKEN_GUESS = 4  # English BPE text is about 4 bytes a token; code and CJK text are not
WARN_TOTAL_BYTES = 10**12  # 1 TB
MAX_TOKENIZER_BYTES = 256 << 20


def bytes_per_token(m: ModelShape) -> int:
    """Stored bytes of one token: aux states 3h + last hidden state h in bf16, two int64 ids."""
    return (AUX_LAYERS + 1) * m.hidden * BF16 + 2 * ID_BYTES


def sample_bytes(m: ModelShape, stored_tokens: int) -> int:
    return stored_tokens * bytes_per_token(m) + FILE_OVERHEAD_BYTES


@dataclass(frozen=True)
class Lengths:
    """Tokens each sample is stored at, and how they were found."""

    stored: dict[int, int]  # stored length -> samples (after truncation to seq and batch padding)
    content_tokens: int  # before padding (after truncation)
    source: str  # "seq", "jsonl (approximate)" or "jsonl (tokenizer FILE)"


@dataclass(frozen=True)
class FeatureEstimate:
    bytes_per_token: int
    samples: int
    stored_tokens: int
    content_tokens: int
    total_bytes: int
    generation_seconds: float
    assumed: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def bytes_per_sample(self) -> int:
        """At the mean stored length."""
        return round(self.total_bytes / self.samples)

    def to_json(self) -> dict[str, Any]:
        return {
            "bytes_per_token": self.bytes_per_token,
            "bytes_per_sample": self.bytes_per_sample,
            "samples": self.samples,
            "stored_tokens": self.stored_tokens,
            "content_tokens": self.content_tokens,
            "total_bytes": self.total_bytes,
            "generation_seconds": self.generation_seconds,
            "assumed": self.assumed,
            "notes": self.notes,
        }


def estimate_features(job, lengths: Lengths, streamed: bool = False) -> FeatureEstimate:
    """The features of `lengths` for the job's target, generated on the job's GPUs; `streamed`: the
    job's capture servers stream them instead (an online SpecForge v0.3 run)."""
    from fitplan.steptime import PREFILL_EFFICIENCY

    m, gpu, world = job.model, job.cluster.gpu, job.world
    counts = lengths.stored
    total = sum(n * sample_bytes(m, length) for length, n in counts.items())
    seconds = _prefill_flops(m, counts) / (world * gpu.bf16_tflops * 1e12 * PREFILL_EFFICIENCY)
    assumed = {
        "format": "SpecForge prepare_hidden_states.py: one uncompressed torch.save .ckpt per sample",
        "hidden_dtype": "bfloat16",
        "lengths": lengths.source,
        "prepare_batch_size": PREPARE_BATCH_SIZE,
        "file_overhead_bytes": FILE_OVERHEAD_BYTES,
        "gpus": world,
        "gpu": gpu.id,
        "prefill_efficiency": PREFILL_EFFICIENCY,
        "generation_time": "a model, not measured: the target's prefill FLOPs over the stored tokens / "
                           "(GPUs x bf16 peak x prefill_efficiency)",
    }
    if lengths.source.startswith("jsonl"):
        assumed["template_tokens_per_message"] = TEMPLATE_TOKENS_PER_MESSAGE
    samples = sum(counts.values())
    stored_tokens = sum(length * n for length, n in counts.items())
    return FeatureEstimate(bytes_per_token(m), samples, stored_tokens, lengths.content_tokens, total, seconds,
                           assumed, _notes(job, total, streamed))


def _prefill_flops(m: ModelShape, counts: dict[int, int]) -> float:
    """Prefill FLOPs of every stored row: the target runs the padded rows whole."""
    from fitplan.steptime import prefill_flops

    return sum(n * prefill_flops(m, length) for length, n in counts.items())


def _notes(job, total: int, streamed: bool) -> list[str]:
    notes = []
    if total > WARN_TOTAL_BYTES:
        notes.append(f"the features need {total / 1e12:.2f} TB of disk (over 1 TB); SpecForge's "
                     "prepare_hidden_states.py does not check free space before writing them")
    weights = weight_bytes(job.model, packed=False)
    if weights > job.world * job.cluster.gpu.total_bytes * 0.9:
        notes.append(f"the target's bf16 weights ({weights / 2**30:.1f} GiB) do not fit on {job.world} "
                     f"{job.cluster.gpu.id}: generating the features needs more GPUs than the time assumes")
    if streamed or not job.spec.offline:
        notes.append("this job gets the target's hidden states live (from the target or capture servers) and "
                     "stores none: the figures are what an offline run of it would write first")
    return notes


# ---------------------------------------------------------------- lengths


def lengths_from_samples(samples: int, seq: int) -> Lengths:
    """Every sample at the job's seq: what --max-length allows, an upper bound."""
    return Lengths({seq: samples}, seq * samples, "seq (every sample at its maximum length: an upper bound)")


def lengths_from_jsonl(path: Path, seq: int, samples: int | None = None,
                       tokenizer: Path | None = None) -> Lengths:
    """The stored length of each sample of a conversation JSONL (its first `samples`, as
    SpecForge's --num-samples takes them): tokens truncated to seq, padded to the longest of
    each batch of PREPARE_BATCH_SIZE in file order."""
    count = _token_counter(tokenizer)
    tokens = []
    for messages in _conversations(path):
        if samples is not None and len(tokens) == samples:
            break
        tokens.append(min(seq, count(messages)))
    if not tokens:
        raise FitplanError(f"--samples-from {path}: holds no conversations (blank lines only)")
    if samples is not None and len(tokens) < samples:
        raise FitplanError(f"--samples {samples}: {path} holds only {len(tokens)} conversations; "
                           f"accepted: at most {len(tokens)}, or leave --samples out to use them all")
    stored: Counter = Counter()
    for start in range(0, len(tokens), PREPARE_BATCH_SIZE):
        batch = tokens[start:start + PREPARE_BATCH_SIZE]
        stored[max(batch)] += len(batch)
    how = f"tokenizer {tokenizer}" if tokenizer else f"approximate: UTF-8 bytes / {BYTES_PER_TOKEN_GUESS}"
    return Lengths(dict(stored), sum(tokens), f"jsonl ({how}, + {TEMPLATE_TOKENS_PER_MESSAGE} template tokens a message)")


def _token_counter(tokenizer: Path | None):
    """messages -> tokens: a local tokenizer.json's count, else the bytes/4 approximation; both
    add the template tokens each message gets."""
    if tokenizer is None:
        return lambda texts: sum(math.ceil(len(t.encode()) / BYTES_PER_TOKEN_GUESS) + TEMPLATE_TOKENS_PER_MESSAGE
                                 for t in texts)
    encoder = _load_tokenizer(tokenizer)
    return lambda texts: sum(len(e.ids) + TEMPLATE_TOKENS_PER_MESSAGE
                             for e in encoder.encode_batch(texts, add_special_tokens=False)) if texts else 0


def _load_tokenizer(path: Path):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise FitplanError("--tokenizer needs the tokenizers package (pip install tokenizers); "
                           "without --tokenizer the token counts are approximated") from None
    if not path.is_file():
        raise FitplanError(f"--tokenizer {path}: not a file; give a local tokenizer.json")
    if path.stat().st_size > MAX_TOKENIZER_BYTES:
        raise FitplanError(f"--tokenizer {path}: larger than {MAX_TOKENIZER_BYTES >> 20} MiB; give a tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception:  # the Rust library raises its own exception type for any unreadable file
        raise FitplanError(f"--tokenizer {path}: not a tokenizer.json the tokenizers library can read") from None


def _conversations(path: Path) -> Iterator[list[str]]:
    """The message texts of each non-blank line; a line that is not a conversation is an error."""
    if path.is_dir() or not path.is_file():
        raise FitplanError(f"--samples-from {path}: {'is a directory' if path.is_dir() else 'does not exist'}; "
                           "give a conversation JSONL file")
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                if raw.strip():
                    yield _message_texts(raw, path, number)
    except OSError as exc:
        raise FitplanError(f"--samples-from {path}: cannot be read ({exc.strerror})") from None


FORMAT = ("accepted: one JSON object a line with a 'conversations' list ({from, value} or {role, content}) "
          "or a 'messages' list ({role, content})")


def _message_texts(raw: bytes, path: Path, number: int) -> list[str]:
    where = f"--samples-from {path}:{number}"
    try:
        record = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise FitplanError(f"{where}: not UTF-8 text") from None
    except (json.JSONDecodeError, RecursionError):
        raise FitplanError(f"{where}: not valid JSON; {FORMAT}") from None
    turns = record.get("conversations", record.get("messages")) if isinstance(record, dict) else None
    if not isinstance(turns, list):
        raise FitplanError(f"{where}: no 'conversations' or 'messages' list; {FORMAT}")
    texts = []
    for turn in turns:
        text = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if isinstance(text, list):  # content parts: [{"type": "text", "text": ...}]
            text = "".join(p.get("text", "") for p in text if isinstance(p, dict) and isinstance(p.get("text"), str))
        if not isinstance(text, str):
            raise FitplanError(f"{where}: a message without text (a 'value' or 'content' string); {FORMAT}")
        texts.append(text)
    return texts
