"""Write target features in SpecForge's offline format (trainer/features.py describes it).

For tests and device checks without SpecForge or SGLang: a target built here (random weights,
`trainer.target.build_random`) runs each sample once, and the file holds what
prepare_hidden_states.py would store for it: the tokens, the loss mask, the final-norm last
hidden state and the aux layers' outputs.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import torch

from trainer.target import TappedTarget, build_random, hf_config

GROUP_SIZE = 2000  # prepare_hidden_states.py --file-group-size default


def feature_path(directory: Path, index: int, group_size: int = GROUP_SIZE, compress: bool = False) -> Path:
    """DIR/rows_<a>-<b>/data_<index>.ckpt[.gz], the writer's layout."""
    start = index // group_size * group_size
    suffix = ".ckpt.gz" if compress else ".ckpt"
    return Path(directory) / f"rows_{start}-{start + group_size}" / f"data_{index}{suffix}"


@torch.no_grad()
def sample_record(tapped: TappedTarget, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """One sample's four tensors: the decoder's output is the last hidden state after the final
    norm (what the lm_head reads), and the hooks catch the aux layers' outputs on the way."""
    device = next(tapped.model.parameters()).device
    decoder = tapped.model.get_decoder()
    last = decoder(input_ids=ids[None].to(device), use_cache=False).last_hidden_state
    aux = torch.cat([tapped.captured[i] for i in tapped.aux_layers], dim=-1)
    tapped.captured.clear()
    return {"input_ids": ids.long().cpu(), "loss_mask": mask.long().cpu(),
            "hidden_state": last.cpu(), "aux_hidden_state": aux.cpu()}


def write_features(directory: Path, tapped: TappedTarget, samples, compress: bool = False) -> list[Path]:
    """One file per (input_ids [n], loss_mask [n]) sample, numbered from 0."""
    paths = []
    for index, (ids, mask) in enumerate(samples):
        path = feature_path(directory, index, compress=compress)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = sample_record(tapped, ids, mask)
        if compress:
            with gzip.open(path, "wb") as f:
                torch.save(record, f)
        else:
            torch.save(record, path)
        paths.append(path)
    return paths


def write_random_target_features(directory: Path, model_ref: str, aux_layers: tuple[int, ...], samples,
                                 device: torch.device | str = "cpu", compress: bool = False) -> list[Path]:
    """Features of the random target `fitplan train --random-weights` builds for `model_ref`."""
    model = build_random(hf_config(model_ref), torch.device(device)).eval()
    model.requires_grad_(False)
    return write_features(directory, TappedTarget(model, tuple(aux_layers)), samples, compress=compress)
