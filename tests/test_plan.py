"""Plan files: fit -o writes a plan that estimate and load_spec read back unchanged."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from fitplan.cli import app
from fitplan.config import FIELD_NAMES, load_spec
from fitplan.estimator import estimate_spec
from fitplan.records import read_plan

# gpt-oss-120b at tp 8, micro-batch 2, seq 8192 gathers tp·B·S = 131072 rows of V = 201088
# logits on every rank (52.7 G elements; 98 GiB in bf16 alone): over an H100, so fit must change it.
ARGS = ["fit", "-m", "gpt-oss-120b", "--gpus", "8xH100", "--seq", "8192", "--global-batch", "64",
        "--tp", "8", "--micro-batch", "2"]


def test_fit_writes_a_complete_plan_that_reads_back(tmp_path):
    path = tmp_path / "plan.yaml"
    result = CliRunner().invoke(app, [*ARGS, "-o", str(path)])
    assert result.exit_code == 0, result.output
    plan = yaml.safe_load(path.read_text())
    assert plan["fitplan_plan"] == 1
    assert set(plan["config"]) == set(FIELD_NAMES)  # every RunSpec key, none missing
    assert plan["config"]["tp"] == 8 and plan["config"]["accum"] is not None
    assert (plan["config"]["seq"], plan["config"]["global_batch"]) == (8192, 64)
    assert plan["trail"][0]["rung"] == "original" and plan["trail"][0]["fits"] is False
    spec = read_plan(path).config
    assert spec == load_spec(path)
    # The plan's prediction is what estimating its config gives now.
    assert estimate_spec(spec).peak_reserved_bytes == plan["prediction"]["peak_reserved_bytes"]
    assert plan["prediction"]["step_time_s"] > 0 and plan["prediction"]["tokens_per_s"] > 0


def test_estimate_reads_the_plan(tmp_path):
    path = tmp_path / "plan.yaml"
    CliRunner().invoke(app, [*ARGS, "-o", str(path)])
    result = CliRunner().invoke(app, ["estimate", str(path), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["fits"] is True


def test_fit_json_has_plan_and_trail():
    out = json.loads(CliRunner().invoke(app, [*ARGS, "--json"]).output)
    assert out["fits"] is True and out["plan"]["config"]["seq"] == 8192
    keys = {"rung", "change", "peak_reserved_bytes", "fits", "verdict", "slowdown"}
    assert out["trail"] and keys <= set(out["trail"][0])
    assert out["trail"][0]["verdict"] == "OOM"  # 98 GiB of gathered logits alone, on 79 GiB


def test_fit_takes_a_job_at_risk_to_a_plan_that_fits():
    """sft qwen3-8b b4 seq 10752 with expandable segments on one H200: the allocator model fits it
    only after freeing its cache once (at risk), so fit does not keep it as given."""
    args = ["fit", "-m", "qwen3-8b", "--gpus", "1xH200", "--workload", "sft", "--seq", "10752", "--micro-batch", "4",
            "--ac", "--precision", "bf16", "--expandable-segments", "--json"]  # fmt: skip
    out = json.loads(CliRunner().invoke(app, args).output)
    assert (out["trail"][0]["verdict"], out["trail"][0]["fits"]) == ("at risk", False)
    assert out["fits"] is True and out["changes"]
    assert out["peak_reserved_bytes"] == out["plan"]["prediction"]["peak_reserved_bytes"]


def test_nothing_fits_exit_1_with_suggestions():
    # Llama-3.1-405B (~810 GB of bf16 weights) on one H100 cannot fit at any seq: no plan, exit 1.
    result = CliRunner().invoke(app, ["fit", "-m", "llama-3.1-405b", "--gpus", "1xH100", "--json"])
    assert result.exit_code == 1
    out = json.loads(result.output)
    assert out["fits"] is False and out["plan"] is None and out["suggestions"]["max_seq"] is None


def test_malformed_plans_exit_2(tmp_path):
    bad = {
        "not_yaml.yaml": "fitplan_plan: 1\nconfig: {model: [\n",
        "no_config.yaml": "fitplan_plan: 1\nprediction: {}\n",
        "bad_key.yaml": "fitplan_plan: 1\nconfig: {model: llama-3.1-8b, sequence: 3}\n",
        "list.yaml": "- 1\n- 2\n",
        "future.yaml": "fitplan_plan: 2\nconfig: {model: llama-3.1-8b}\n",
        "unversioned.yaml": "fitplan_plan: null\nconfig: {model: llama-3.1-8b}\n",
        "bad_trail.yaml": "fitplan_plan: 1\nconfig: {model: llama-3.1-8b}\ntrail: 3\n",
    }
    for name, text in bad.items():
        path = tmp_path / name
        path.write_text(text)
        for command in (["fit", str(path)], ["train", "--plan", str(path), "--synthetic-data", "--device", "cpu"]):
            if name == "bad_trail.yaml" and command[0] == "fit":
                continue  # fit reads a plan as a config: its trail is not read
            result = CliRunner().invoke(app, command)
            assert result.exit_code == 2, (name, command[0], result.output)
            assert len(result.output.strip().splitlines()) == 1, result.output
    future = CliRunner().invoke(app, ["estimate", str(tmp_path / "future.yaml")])
    assert "plan version 2 is not one this fitplan reads (accepted: fitplan_plan: 1)" in future.output
