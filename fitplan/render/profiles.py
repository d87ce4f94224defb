"""`fitplan profiles`: the models, Eagle3 drafts and GPUs the profiles hold."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from fitplan.render.estimate import gib
from fitplan.render.tables import fit_columns


def profile_tables(width: int | None = None) -> list[Table]:
    """`fitplan profiles`: the models, drafts and GPUs the profiles hold, wrapped (never cut) to
    `width`, the terminal's when not given."""
    from fitplan.shapes import count_params
    from fitplan.profiles import (
        draft_names,
        gpu_names,
        load_draft,
        load_gpu,
        load_model,
        model_names,
    )

    loaded = {name: load_model(name) for name in model_names()}
    packed: dict[str, list[str]] = {}
    for name, m in loaded.items():
        if m.packed_format:
            packed.setdefault(m.packed_format, []).append(name)
    caption = "; ".join(f"{fmt}-packed weights (--target-weights {fmt}): {', '.join(names)}"
                        for fmt, names in packed.items())
    models = Table(title="Models", title_justify="left", caption=caption or None, caption_justify="left")
    for col in ("name", "params", "layers", "hidden", "heads (kv)", "vocab", "MoE experts (active)"):
        models.add_column(col, no_wrap=col == "name", justify="left" if col == "name" else "right")
    for name, m in loaded.items():
        moe = f"{m.experts} ({m.experts_per_token})" if m.is_moe else "-"
        models.add_row(name, f"{count_params(m).total / 1e9:.2f}B", str(m.layers), str(m.hidden),
                       f"{m.heads} ({m.kv_heads})", str(m.vocab), moe)

    drafts = Table(title="Eagle3 drafts (--draft)", title_justify="left")
    for col in ("name", "for model", "hidden", "MLP", "draft vocab", "params: trainable + frozen embedding"):
        drafts.add_column(col, no_wrap=col == "name", justify="left" if col in ("name", "for model") else "right")
    for name in draft_names():
        target = next((m for m in loaded.values() if load_draft("auto", m).name == name), None)
        if target is None:
            continue  # a draft whose target has no model profile cannot be sized
        d = load_draft(name, target)
        drafts.add_row(name, target.name, str(d.hidden), str(d.intermediate), str(d.draft_vocab),
                       f"{d.trainable_params() / 1e6:.0f}M + {d.frozen_params() / 1e6:.0f}M")

    gpus = Table(title="GPUs (--gpus COUNTxNAME)", title_justify="left")
    for col in ("name", "memory (GiB, as torch reports)", "bf16 dense TFLOPs", "memory TB/s", "aliases"):
        gpus.add_column(col, no_wrap=col == "name", justify="left" if col in ("name", "aliases") else "right")
    for name in gpu_names():
        g = load_gpu(name)
        gpus.add_row(g.id, gib(g.total_bytes), f"{g.bf16_tflops:.0f}", f"{g.memory_tbps:.2f}", ", ".join(dict.fromkeys(a for a in g.aliases if a != g.id)))
    tables = [models, drafts, gpus]
    width = width or Console().width
    for table in tables:
        fit_columns(table, width)
    return tables
