"""fitplan check (the CI gate) and fitplan diff, through the CLI, on configs in a temporary git repo.

Verdicts need no exact figures: a 1xH100 Llama-3.1-8B Eagle3 job at seq 4096 with flex
attention is the small case; the same job with eager attention at seq 32768 materializes
[B, H, S, S+k] fp32 scores: 110 B x 32 heads x 32768² ≈ 3.5 TiB (docs/estimate.md, "Draft"),
far beyond 79 GiB.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from typer.testing import CliRunner

from fitplan.cli import app

SMALL = "model: llama-3.1-8b\ngpus: 1xH100\nseq: 4096\n"
HUGE = "model: llama-3.1-8b\ngpus: 1xH100\nseq: 32768\nattention: eager\n"


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def repo(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q", "-b", "main")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (tmp_path / "train.yaml").write_text(SMALL)
    git("add", "train.yaml")
    git("commit", "-qm", "baseline")
    return tmp_path


def test_all_fit_exit_0_and_oom_exit_1(tmp_path):
    (tmp_path / "a.yaml").write_text(SMALL)
    (tmp_path / "b.yaml").write_text(HUGE)
    assert invoke("check", str(tmp_path / "a.yaml")).exit_code == 0
    result = invoke("check", str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml"), "--format", "json")
    assert result.exit_code == 1
    verdicts = [r["verdict"] for r in json.loads(result.output)["rows"]]
    assert verdicts == ["fits", "OOM"]


def test_a_job_at_risk_fails_the_gate_until_it_fits(tmp_path):
    """sft qwen3-8b b4 at seq 10752 with expandable segments on one H200 (a measured row: it ran):
    the allocator model fits it only after freeing its cache once (a retry), so "at risk"; at
    micro-batch 2 it fits with room."""
    config = tmp_path / "sft.yaml"
    config.write_text("model: qwen3-8b\ngpus: 1xH200\nworkload: sft\nseq: 10752\nmicro_batch: 4\nac: true\n"
                      "precision: bf16\nexpandable_segments: true\n")  # fmt: skip
    risky = invoke("check", str(config), "--format", "json")
    assert risky.exit_code == 1 and json.loads(risky.output)["rows"][0]["verdict"] == "AT RISK"
    config.write_text(config.read_text().replace("micro_batch: 4", "micro_batch: 2"))
    assert invoke("check", str(config)).exit_code == 0


def test_margin_makes_a_tight_fit_fail(tmp_path):
    (tmp_path / "a.yaml").write_text(SMALL)
    result = invoke("check", str(tmp_path / "a.yaml"), "--format", "json")
    headroom = json.loads(result.output)["rows"][0]["headroom_bytes"]
    total = json.loads(result.output)["rows"][0]["gpu_total_bytes"]
    over = 100 * headroom / total + 1  # a margin one point above the headroom
    tight = invoke("check", str(tmp_path / "a.yaml"), "--margin", f"{over:.1f}", "--format", "json")
    assert tight.exit_code == 1 and json.loads(tight.output)["rows"][0]["verdict"] == "TIGHT"


def test_flags_override_every_config(tmp_path):
    (tmp_path / "a.yaml").write_text(SMALL.replace("seq: 4096", "seq: 32768\nattention: eager"))
    assert invoke("check", str(tmp_path / "a.yaml")).exit_code == 1
    assert invoke("check", str(tmp_path / "a.yaml"), "--attention", "flex", "--seq", "4096").exit_code == 0


def test_against_a_revision_reports_the_delta_and_the_component(repo):
    (repo / "train.yaml").write_text(SMALL.replace("4096", "8192"))
    result = invoke("check", str(repo / "train.yaml"), "--against", "main", "--format", "json")
    row = json.loads(result.output)["rows"][0]
    assert result.exit_code == 0
    assert row["delta_bytes"] == row["peak_reserved_bytes"] - row["baseline_peak_reserved_bytes"]
    assert row["delta_bytes"] > 0  # twice the tokens: more memory
    assert row["moved_most"]["delta_bytes"] > 0


def test_a_file_absent_at_the_revision_has_no_baseline(repo):
    (repo / "new.yaml").write_text(SMALL)
    result = invoke("check", str(repo / "new.yaml"), "--against", "main", "--format", "json")
    assert result.exit_code == 0
    assert json.loads(result.output)["rows"][0]["delta_bytes"] is None


def test_markdown_for_the_job_summary(tmp_path):
    (tmp_path / "a.yaml").write_text(SMALL)
    (tmp_path / "b.yaml").write_text(HUGE)
    out = invoke("check", str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml"), "--format", "markdown").output
    lines = out.strip().splitlines()
    assert lines[0] == "### fitplan check: 1 of 2 config(s) fail"
    assert lines[2].startswith("| config | verdict |")
    assert lines[4].split(" | ")[1] == "fits" and lines[5].split(" | ")[1] == "OOM"


@pytest.mark.parametrize("content, args", [
    ("model: llama-3.1-8b\nseq: [1\n", ()),                       # not YAML
    ("model: llama-3.1-8b\nsequence: 4096\n", ()),                # unknown key
    ("model: no-such-model\n", ()),                               # unknown model
    (SMALL, ("--format", "html")),                                 # unknown format
    (SMALL, ("--against", "no-such-rev")),                         # unknown revision
])
def test_bad_input_is_one_line_exit_2(repo, content, args):
    (repo / "bad.yaml").write_text(content)
    result = invoke("check", str(repo / "bad.yaml"), *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.strip().count("\n") <= 1


def test_missing_file_exit_2(tmp_path):
    assert invoke("check", str(tmp_path / "nope.yaml")).exit_code == 2


def test_diff_per_component_and_phase(tmp_path):
    (tmp_path / "old.yaml").write_text(SMALL)
    (tmp_path / "new.yaml").write_text(SMALL.replace("4096", "8192"))
    result = invoke("diff", str(tmp_path / "old.yaml"), str(tmp_path / "new.yaml"), "--json")
    assert result.exit_code == 0
    deltas = json.loads(result.output)
    assert deltas["components"]["activations.draft"] > 0
    assert deltas["components"]["draft.params"] == 0  # seq does not change the parameters
    assert set(deltas["phases"]) >= {"target_forward", "draft_forward", "backward"}
    assert invoke("diff", str(tmp_path / "old.yaml"), str(tmp_path / "missing.yaml")).exit_code == 2
