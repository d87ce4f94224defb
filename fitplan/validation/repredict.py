"""Re-predict stored result rows with the estimator as it is now (deterministic, no GPU).

A row's prediction in rows.jsonl is the estimator's at run time; after calibration the published
accuracy must be the committed estimator's. Each row's RunSpec is rebuilt from its `config`
(trainer reports) or from its matrix row with the sequence length and micro-batch it ran with
(near-limit rows keep the value chosen at run time), then estimated again.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from fitplan.config import RunSpec, spec_from_mapping
from fitplan.records import PREDATING_KEYS, attention_ran, old_defaults_auto, stored_config
from fitplan.estimator import estimate_spec
from fitplan.validation.figures import predict
from fitplan.validation.matrix import MATRIX, resolve_row

PREDICTED = ("pred_alloc", "pred_device", "pred_reserve", "pred_outside", "gpu_total", "pred_fits", "pred_verdict",
             "pred_step_s")  # fmt: skip


def spec_of(record: dict[str, Any]) -> RunSpec | None:
    """The RunSpec a stored row ran; None when it cannot be rebuilt (unknown row, never sized)."""
    config = record.get("config")
    if isinstance(config, dict):
        return spec_from_mapping(stored_config(config), source=str(record.get("source", record["name"])))
    row = next((r for r in MATRIX if r.name == record["name"]), None)
    if row is None or pd.isna(record.get("seq")) or pd.isna(record.get("micro_batch")):
        return None
    # a matrix row stores no config: it ran what the trainer ran before any key it predates
    ran = {**row.base_spec().to_dict(), "seq": int(record["seq"]), "micro_batch": int(record["micro_batch"])}
    return spec_from_mapping(old_defaults_auto(attention_ran({**ran, **PREDATING_KEYS})), source=record["name"])


def repredict(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows with their predicted columns from the current estimator; `prediction` says which."""
    frame = frame.copy()
    for column in PREDICTED:
        frame[column] = frame[column].astype(object) if column in frame else None
    frame["prediction"] = "run time"
    for index, record in frame.iterrows():
        spec = spec_of(record.to_dict())
        if spec is None:
            continue
        fresh = predict(spec)
        for column in PREDICTED:
            frame.at[index, column] = fresh[column]
        frame.at[index, "prediction"] = "current"
    frame["placed_now"] = frame["name"].isin(near_limit_names_now())
    return frame


def near_limit_names_now() -> set[str]:
    """Names a measured near-limit row has (`<row>-s<seq>`) when it ran at the sequence the current
    estimator chooses: the rows that test the committed estimator's verdict at its edges."""
    return {f"{row.name}-s{resolve_row(row, estimate_spec).seq}" for row in MATRIX if row.search == "seq"}
