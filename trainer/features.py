"""Training from precomputed target features in SpecForge's offline format (`--hidden-states DIR`).

The format, as SpecForge's `scripts/prepare_hidden_states.py` writes it (v0.2.0 and since):
one `torch.save` file per sample, `DIR/rows_<a>-<b>/data_<i>.ckpt` (2000 samples a folder by
default; `.ckpt.gz` when written with `--compress`), each a dict of four tensors of the sample's
stored length n:

    input_ids         [n]          int64   the tokens, as the target saw them (batch padding included)
    loss_mask         [n]          int64   1 on the assistant's tokens
    hidden_state      [1, n, h]    bf16    the target's last hidden state, after the final norm
    aux_hidden_state  [1, n, 3h]   bf16    the three aux layers' hidden states, side by side

SpecForge's loader walks DIR recursively for those suffixes and truncates each sample to
`--max-length`; its offline trainer scores `hidden_state` with the target's lm_head for the
teacher and feeds `aux_hidden_state` to the draft. Here the same: `prepare` lists and checks the
directory before anything loads (every file is opened once to count the draft vocabulary, unless
a cached index beside DIR matches the listing), `FeatureBatches` reads one micro-batch of files at
a time, and `teach` builds the teacher through `trainer.target_head.FrozenHead`. A file that
cannot be read or does not fit the job is named in one line (FitplanError).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fitplan.errors import FitplanError
from fitplan.layout import Job
from trainer import data, vocab
from trainer.loss import Teacher, make_teacher

SUFFIXES = (".ckpt", ".ckpt.gz")
KEYS = ("input_ids", "loss_mask", "hidden_state", "aux_hidden_state")
WRITER = "SpecForge's prepare_hidden_states.py (with --enable-aux-hidden-states)"


@dataclass(frozen=True)
class Layout:
    """What a feature file of this job must hold."""

    model: str
    hidden: int  # width of hidden_state: the target's hidden size (the lm_head's input)
    aux_layers: int
    aux_width: int  # width of aux_hidden_state: aux_layers x the target's hidden size
    vocab: int
    draft_vocab: int
    seq: int  # samples are truncated to it, as SpecForge truncates to --max-length

    @classmethod
    def of(cls, job: Job) -> Layout:
        d = job.draft
        return cls(job.model.name, job.model.hidden, len(d.aux_layers), len(d.aux_layers) * d.target_hidden,
                   job.model.vocab, d.draft_vocab, job.spec.seq)


class Sample(NamedTuple):
    ids: torch.Tensor  # [n] int64
    mask: torch.Tensor  # [n] bool
    hidden: torch.Tensor  # [n, h]
    aux: torch.Tensor  # [n, aux_width]


# ------------------------------------------------------------------ one file


def list_files(directory: Path) -> list[Path]:
    """Feature files under `directory` and its subfolders, in a fixed (sorted) order."""
    found = [p for p in directory.rglob("*") if p.name.endswith(SUFFIXES) and not p.is_dir()]
    return sorted(found, key=lambda p: str(p.relative_to(directory)))


def read_record(path: Path) -> dict:
    """The file's dict of tensors, memory-mapped (`.ckpt`) or decompressed (`.ckpt.gz`)."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (FileNotFoundError, NotADirectoryError):
        raise FitplanError(f"{path}: the feature file is missing (it was listed, then it was gone)") from None
    except PermissionError as exc:
        raise FitplanError(f"{path}: cannot read the feature file ({exc.strerror})") from None
    except Exception as exc:  # noqa: BLE001 - torch.load, zip, pickle and gzip each raise their own types for a bad file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise FitplanError(f"{path}: not a readable feature file, truncated or corrupt ({reason})") from None


def check_record(record, path: Path, layout: Layout) -> Sample:
    """The sample's tensors (truncated to the job's seq), or a one-line error naming what does not fit."""
    if not isinstance(record, dict):
        raise FitplanError(f"{path}: holds a {type(record).__name__}, not the dict of tensors {WRITER} writes")
    missing = [k for k in KEYS if not torch.is_tensor(record.get(k))]
    if missing:
        raise FitplanError(f"{path}: no {', '.join(missing)} tensor; a feature file of {WRITER} holds "
                           f"{', '.join(KEYS)}")
    ids, mask = (_rows(record[k], 1, k, path) for k in ("input_ids", "loss_mask"))
    hidden, aux = (_rows(record[k], 2, k, path) for k in ("hidden_state", "aux_hidden_state"))
    if hidden.shape[-1] != layout.hidden:
        raise FitplanError(f"{path}: hidden_state is {hidden.shape[-1]} wide but {layout.model} has hidden size "
                           f"{layout.hidden}: features of another model (accepted: features of this target)")
    if aux.shape[-1] != layout.aux_width:
        raise FitplanError(f"{path}: aux_hidden_state is {aux.shape[-1]} wide but the draft reads {layout.aux_layers} "
                           f"layers of {layout.model} ({layout.aux_layers} x {layout.aux_width // layout.aux_layers} "
                           f"= {layout.aux_width}): features of another model")
    lengths = {k: len(t) for k, t in zip(KEYS, (ids, mask, hidden, aux))}
    if len(set(lengths.values())) > 1 or not lengths["input_ids"]:
        shown = ", ".join(f"{k} {n}" for k, n in lengths.items())
        raise FitplanError(f"{path}: the tensors disagree on the sample's length or it is empty ({shown} tokens)")
    if ids.is_floating_point() or ids.is_complex() or not hidden.is_floating_point() or not aux.is_floating_point():
        raise FitplanError(f"{path}: input_ids must be integers and the hidden states floating point "
                           f"(got {ids.dtype}, {hidden.dtype}, {aux.dtype})")
    n = layout.seq
    return Sample(ids[:n].long(), mask[:n].bool(), hidden[:n], aux[:n])


def _rows(t: torch.Tensor, dims: int, key: str, path: Path) -> torch.Tensor:
    """`t` without the leading batch dimension of 1 the writer adds ([1, n, w] -> [n, w])."""
    if t.dim() == dims + 1 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != dims:
        want = "[n]" if dims == 1 else "[1, n, width]"
        raise FitplanError(f"{path}: {key} has shape {list(t.shape)}, expected {want}")
    return t


def check_ids(sample: Sample, path: Path, layout: Layout) -> None:
    ids = sample.ids
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= layout.vocab:
        bad = low if low < 0 else high
        raise FitplanError(f"{path}: token id {bad} is outside {layout.model}'s vocabulary of {layout.vocab}: "
                           "features of another model (accepted: features of this target)")


def load_sample(path: Path, layout: Layout) -> Sample:
    sample = check_record(read_record(path), path, layout)
    check_ids(sample, path, layout)
    return sample


# ------------------------------------------------------------------ the directory


@dataclass(frozen=True)
class FeatureSet:
    directory: Path
    files: tuple[Path, ...]
    lengths: tuple[int, ...]  # stored tokens per file, before truncation to seq
    draft_ids: torch.Tensor  # sorted target ids of the draft vocabulary (trainer/vocab.py)
    layout: Layout


_PREPARED: dict[str, FeatureSet] = {}  # by identity: `fitplan train` checks, then the loop builds


def prepare(directory: Path, job: Job) -> FeatureSet:
    """Every check of a features directory that needs no model, before anything loads.

    The first file is checked in full whatever the cache says; the draft vocabulary and each
    file's length come from one pass over every file (each opened, checked and its input_ids
    counted), cached beside DIR under a name that changes with the listing (paths, sizes, mtimes)
    and the job's vocabularies and seq."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FitplanError(f"--hidden-states {directory}: no such directory (give the --output-path of {WRITER})")
    files = list_files(directory)
    if not files:
        raise FitplanError(f"--hidden-states {directory}: no feature files ({', '.join('*' + s for s in SUFFIXES)}) "
                           "in it or its subfolders")
    layout = Layout.of(job)
    key = _identity(directory, files, layout)
    if key in _PREPARED:
        return _PREPARED[key]
    load_sample(files[0], layout)
    wide = job.spec.micro_batch * job.world
    if len(files) < wide:
        raise FitplanError(f"--hidden-states {directory}: {len(files)} feature files, fewer than micro_batch "
                           f"{job.spec.micro_batch} x {job.world} ranks")
    cache = _cache_path(directory, key)
    index = _load_index(cache, len(files))
    if index is None:
        index = _scan(files, layout)
        vocab.save_cache(index, cache)
    prepared = FeatureSet(directory, tuple(files), tuple(index["lengths"].tolist()), index["draft_ids"], layout)
    _PREPARED[key] = prepared
    return prepared


def _identity(directory: Path, files: list[Path], layout: Layout) -> str:
    listing = []
    for p in files:
        try:
            st = p.stat()
        except OSError:
            raise FitplanError(f"{p}: the feature file is missing (it was listed, then it was gone)") from None
        listing.append((str(p.relative_to(directory)), st.st_size, st.st_mtime_ns))
    text = json.dumps({"dir": str(directory.resolve()), "files": listing, "vocab": layout.vocab,
                       "draft_vocab": layout.draft_vocab, "seq": layout.seq})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cache_path(directory: Path, key: str) -> Path | None:
    resolved = directory.resolve()
    return resolved.with_name(f"{resolved.name}.fitplan-index-{key}.pt") if resolved.name else None


def _load_index(cache: Path | None, files: int) -> dict | None:
    if cache is None or not cache.is_file():
        return None
    try:
        index = torch.load(cache, weights_only=True)
        whole = len(index["lengths"]) == files and index["draft_ids"].dim() == 1
    except Exception:  # noqa: BLE001 - an unreadable cache is rebuilt, never trusted
        return None
    return index if whole else None


def _scan(files: list[Path], layout: Layout) -> dict:
    """Open every file once: check it, note its length, count its loss tokens for the draft vocab."""
    lengths = []

    def samples() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for path in files:
            sample = load_sample(path, layout)
            lengths.append(int(sample.ids.numel()))
            yield sample.ids, sample.mask

    draft_ids = vocab.top_tokens(samples(), layout.vocab, layout.draft_vocab)
    return {"draft_ids": draft_ids, "lengths": torch.tensor(lengths, dtype=torch.long)}


# ------------------------------------------------------------------ batches and the teacher


class FeatureBatches(data.Batches):
    """Micro-batches of feature files, read when taken (nothing is held beyond one micro-batch).

    `next()` returns (input_ids, loss_mask) like `data.Batches`; the batch's hidden states wait in
    `features()` for `teach`. Each rank reads only its own rows (no target: no TP group to pad for).
    """

    def __init__(self, prepared: FeatureSet, micro_batch: int, seed: int, rank: int = 0, world: int = 1):
        super().__init__(list(prepared.files), micro_batch, seed, rank=rank, world=world)
        self.prepared = prepared
        self._states: tuple[torch.Tensor, torch.Tensor] | None = None

    def length(self, index: int) -> int:
        return self.prepared.lengths[index]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        paths = self.take()[self.own_rows()]
        try:
            samples = [load_sample(p, self.prepared.layout) for p in paths]
        except FitplanError as exc:
            raise FitplanError(f"{exc}; the run stopped at micro-batch {self.position} (checkpoints already written "
                               "are kept: replace the file and continue with --resume)") from None
        ids, mask = data.pad_batch([(s.ids, s.mask) for s in samples])
        self._states = (_pad_states([s.aux for s in samples]), _pad_states([s.hidden for s in samples]))
        return ids, mask

    def features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(aux hidden [B, S, 3h], last hidden [B, S, h]) of the micro-batch `next()` took, bf16 on the host."""
        states, self._states = self._states, None
        return states


def _pad_states(rows: list[torch.Tensor]) -> torch.Tensor:
    """[n_i, w] rows -> [B, max n, w] bf16, zeros after each row (masked out of the loss)."""
    out = torch.zeros(len(rows), max(len(r) for r in rows), rows[0].shape[-1], dtype=torch.bfloat16)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def teach(run, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Teacher]:
    """`trainer.loop.teach` for stored features: (aux hidden, input ids padded by ttt, teacher).

    The teacher's logits are the target's lm_head over the stored last hidden state; they and the
    hidden state die here, as the target's logits do online."""
    ttt = run.job.spec.ttt
    aux, hidden = (t.to(run.device) for t in run.batches.features())
    logits = run.target(hidden)
    del hidden
    teacher = make_teacher(logits, mask, run.draft_ids, run.draft.t2d, ttt, as_logits=run.draft.fused_norms)
    return aux, F.pad(ids, (0, ttt)), teacher
