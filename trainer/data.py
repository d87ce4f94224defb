"""Training samples: ShareGPT-style JSONL through the target's chat template, or synthetic.

A sample is (input_ids [n], loss_mask [n]) with n <= seq; the mask marks assistant tokens.
Micro-batches are padded to their longest sample. The first micro-batch of a run holds the
longest samples, so the memory peak shows at step 2 rather than hours in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fitplan.errors import FitplanError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def parse_line(line: str) -> list[dict] | None:
    """Messages [{role, content}] of one JSONL line, or None if it is unusable."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("conversations"), list):
        turns = [(t.get("from"), t.get("value")) for t in record["conversations"] if isinstance(t, dict)]
    elif isinstance(record.get("messages"), list):
        turns = [(t.get("role"), t.get("content")) for t in record["messages"] if isinstance(t, dict)]
    else:
        return None
    messages = [{"role": ROLES.get(r), "content": c} for r, c in turns if isinstance(c, str)]
    if any(m["role"] is None for m in messages) or not any(m["role"] == "assistant" for m in messages):
        return None
    return messages


def tokenize(messages: list[dict], tokenizer, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-template tokens and a mask of the assistant replies' tokens.

    An assistant reply spans the characters between the rendering of the conversation before
    it (with the generation prompt) and the rendering including it; tokens starting inside a
    span are trained on. This works with any template whose renderings are prefixes of each other.
    """
    render = lambda msgs, prompt: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)
    text = render(messages, False)
    spans = [
        (len(render(messages[:i], True)), len(render(messages[: i + 1], False)))
        for i, m in enumerate(messages)
        if m["role"] == "assistant"
    ]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_length)
    mask = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
    return torch.tensor(enc["input_ids"], dtype=torch.long), torch.tensor(mask, dtype=torch.bool)


@dataclass
class Loaded:
    samples: list[tuple[torch.Tensor, torch.Tensor]]
    skipped: int  # lines that were not JSON, had no assistant turn, or no assistant token left after truncation


def load_jsonl(path: Path, tokenizer, max_length: int) -> Loaded:
    if not path.is_file():
        raise FitplanError(f"--data {str(path)!r} does not exist")
    samples, skipped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        messages = parse_line(line)
        sample = tokenize(messages, tokenizer, max_length) if messages else None
        if sample is None or not sample[1].any():
            skipped += 1
            continue
        samples.append(sample)
    if not samples:
        raise FitplanError(
            f"{path}: no usable line ({skipped} skipped); each line must be JSON with "
            "'conversations' [{from, value}] or 'messages' [{role, content}] holding an assistant turn"
        )
    return Loaded(samples, skipped)


def synthetic_sample(index: int, seq: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens of exactly `seq` positions, all trained on: the worst case for memory."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randint(vocab, (seq,), generator=gen), torch.ones(seq, dtype=torch.bool)


def pad_batch(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(ids) for ids, _ in samples)
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    mask = torch.zeros(len(samples), length, dtype=torch.bool)
    for row, (i, m) in enumerate(samples):
        ids[row, : len(i)], mask[row, : len(m)] = i, m
    return ids, mask


class Batches:
    """Micro-batches in a reproducible order; `position` (micro-batches taken) is the resume point.

    With several data-parallel ranks, micro-step p's global batch is the world*B samples a
    single process with micro_batch world*B would take at p; rank r gets rows r*B..r*B+B-1.
    """

    def __init__(self, samples, micro_batch: int, seed: int, synthetic: tuple[int, int] | None = None,
                 rank: int = 0, world: int = 1):
        self.samples, self.micro_batch, self.seed = samples, micro_batch, seed
        self.synthetic = synthetic  # (seq, vocab): generate sample i on demand
        self.rank, self.world = rank, world
        self.position = 0
        if synthetic is None and len(samples) < micro_batch * world:
            raise FitplanError(f"the data holds {len(samples)} usable samples, fewer than micro_batch {micro_batch} "
                               f"x {world} ranks")

    def _epoch_order(self, epoch: int) -> list[int]:
        n = len(self.samples)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        if epoch == 0:  # longest first: the peak shows in the first steps
            longest = sorted(range(n), key=lambda i: -self.length(i))[: self.micro_batch * self.world]
            chosen = set(longest)
            order = longest + [i for i in order if i not in chosen]
        return order

    def length(self, index: int) -> int:
        """Tokens of sample `index` (orders the first epoch)."""
        return len(self.samples[index][0])

    def take(self) -> list:
        """The next global batch's world*B samples (entries of `samples`, or synthetic samples)."""
        wide = self.micro_batch * self.world
        if self.synthetic is not None:
            seq, vocab = self.synthetic
            picked = [synthetic_sample(self.position * wide + r, seq, vocab, self.seed) for r in range(wide)]
        else:
            per_epoch = len(self.samples) // wide
            epoch, index = divmod(self.position, per_epoch)
            picked = [self.samples[i] for i in self._epoch_order(epoch)[index * wide : (index + 1) * wide]]
        self.position += 1
        return picked

    def own_rows(self) -> slice:
        return slice(self.rank * self.micro_batch, (self.rank + 1) * self.micro_batch)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        # padded as one global batch: the ranks of a TP group must pass the same length to the target
        ids, mask = pad_batch(self.take())
        rows = self.own_rows()
        return ids[rows], mask[rows]
