"""benchmarks/vs_specforge.py on CPU: fitplan's side of a child on a tiny draft, the table, the budget.

The SpecForge side needs its wheel and a GPU (Triton loss, flex backward); it is not run here.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
TARGET = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
          "vocab_size": 512, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
          "tie_word_embeddings": False}
DRAFT = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 16, "vocab_size": 512, "draft_vocab_size": 128}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("vs_specforge", ROOT / "benchmarks" / "vs_specforge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("configs")
    (d / "target.json").write_text(json.dumps(TARGET))
    (d / "draft.json").write_text(json.dumps(DRAFT))
    return ["--model", str(d / "target.json"), "--draft", str(d / "draft.json")]


def tiny_step_flops(b: int, s: int, ttt: int) -> int:
    """The docstring's formula by hand for the tiny draft: h 64, I 128, H 4, K 2, d 16, Vd 128, h_t 64, V 512."""
    h, inter, heads, kv, d, vd, ht, v = 64, 128, 4, 2, 16, 128, 64, 512
    per_step = 2 * h * (heads + 2 * kv) * d + heads * d * h + 3 * h * inter + 4 * h + h * vd  # 53,504
    forward = 2 * b * s * (3 * ht * h) + ttt * (2 * b * s * per_step + 2 * b * s * s * heads * d)
    return 3 * forward + 2 * b * s * v * ht


@pytest.mark.parametrize("tool", ["fitplan", "fitplan-recompute-mlp"])
def test_fitplan_child_prints_one_json_line_with_every_field(bench, configs, capsys, tool):
    argv = ["--child", tool, "--shape", "2x32", *configs, "--attention", "sdpa", "--device", "cpu",
            "--warmup", "0", "--steps", "1", "--ttt", "2"]
    assert bench.main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(bench.MARK)]
    assert len(lines) == 1
    result = json.loads(lines[0][len(bench.MARK):])
    assert result["ok"], result.get("error")
    assert set(bench.RESULT_FIELDS) <= set(result)
    assert (result["tool"], result["batch"], result["seq"]) == (tool, 2, 32)
    assert result["recompute_mlp"] == (tool == "fitplan-recompute-mlp")
    assert set(result["phases_s"]) == {"teacher", "forward", "backward", "optimizer"}
    assert len(result["unmetered_step_s_all"]) == 1 and result["unmetered_step_s"] > 0  # as many as --steps
    assert result["flops"] == tiny_step_flops(2, 32, 2) == 51_576_832
    assert result["tokens_per_s"] == pytest.approx(64 / result["step_s"])
    assert result["mfu"] == pytest.approx(result["flops"] / result["step_s"] / 989e12)
    assert math.isfinite(result["losses"][0]) and result["draft_mem"] > 0
    assert result["valid"] > 0.9  # the doubled draft-vocab rows put the target's top token in the draft vocab


def test_table_ratios_are_fitplan_over_specforge(bench):
    gib = 2**30
    common = {"batch": 1, "seq": 2048, "ok": True, "peak_tflops": 989.0, "device": "NVIDIA H200",
              "first_step_s": 40.0}
    results = [{**common, "tool": "specforge", "step_s": 1.0, "unmetered_step_s": 0.75, "draft_mem": 4 * gib,
                "tokens_per_s": 2048.0, "mfu": 0.40, "sm_mhz": 1740.0, "watts": 680.0, "joules_per_step": 680.0},
               {**common, "tool": "fitplan", "step_s": 0.5, "unmetered_step_s": 0.3, "draft_mem": 3 * gib,
                "tokens_per_s": 4096.0, "mfu": 0.80, "sm_mhz": 1600.0, "watts": 700.0, "joules_per_step": 350.0},
               {"tool": "specforge", "batch": 2, "seq": 4096, "ok": False, "error": "out of memory: x"}]
    table = bench.render({"specforge_teacher": "full", "attention": "flex"}, results)
    row = next(line for line in table.splitlines() if line.startswith("| 1 x 2048"))
    # 0.5 s / 1.0 s, unmetered 0.3 s / 0.75 s and 3 GiB / 4 GiB
    assert ("| 0.500 / 1.000 | 0.50x | 0.300 / 0.750 | 0.40x | 3.00 / 4.00 | 0.75x | 4,096 / 2,048 "
            "| 80.0% / 40.0% |") in row
    # 1600 / 1740 MHz, 700 / 680 W and 350 J / 680 J a step
    assert row.endswith("| 1600 / 1740 | 700 / 680 | 350 / 680 | 0.51x |"), row
    assert "| 2 x 4096 | — / — | — | — / — | — |" in table
    assert "Not measured: specforge 2x4096: out of memory: x" in table
    assert "989.0 TFLOP/s" in table and "counted in both" in table


def test_child_flags_round_trip(bench, configs, tmp_path):
    args = bench.parser().parse_args(["--out", str(tmp_path), *configs, "--attention", "sdpa", "--ttt", "3",
                                      "--specforge-teacher", "compact", "--assistant-fraction", "0.5"])
    argv = bench.child_argv(args, "specforge", 2, 4096)
    child = bench.parser().parse_args(argv[2:])
    assert (child.child, child.shape) == ("specforge", [(2, 4096)])
    for flag in ("model", "draft", "attention", "ttt", "specforge_teacher", "assistant_fraction", "warmup", "steps"):
        assert getattr(child, flag) == getattr(args, flag), flag


def test_spent_budget_starts_nothing_and_still_writes(bench, tmp_path, capsys):
    assert bench.main(["--out", str(tmp_path), "--budget", "0", "--tools", "fitplan", "--shapes", "1x32,2x64"]) == 0
    saved = json.loads((tmp_path / bench.OUT_JSON).read_text())
    assert [(r["batch"], r["seq"], r["ok"]) for r in saved["results"]] == [(1, 32, False), (2, 64, False)]
    assert all("budget" in r["error"] for r in saved["results"])
    assert "Not measured" in (tmp_path / bench.OUT_MD).read_text()
    assert "| 1 x 32 |" in capsys.readouterr().out


def test_bad_shape_is_one_line_exit_2(bench, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--out", "x", "--shapes", "1x2048,4096"])
    assert exit_.value.code == 2
    assert "'4096' is not BATCHxSEQ" in capsys.readouterr().err


def test_child_past_the_hard_stop_is_killed_and_recorded(bench, configs, tmp_path):
    # a child imports torch, resolves the job and builds the draft: well over 1 s
    argv = ["--out", str(tmp_path), "--tools", "fitplan", "--shapes", "1x32", *configs, "--attention", "sdpa",
            "--device", "cpu", "--hard-stop", "1"]
    assert bench.main(argv) == 0
    (result,) = json.loads((tmp_path / bench.OUT_JSON).read_text())["results"]
    assert not result["ok"] and result["error"].startswith("killed at the hard stop")


def test_idle_summary_by_hand(bench):
    """Kernels (start, end) in us: a 0-100, b 50-150 (overlaps a), c 400-500, d 450-460 (inside c),
    e 1500-1600. Busy: 0-150, 400-500, 1500-1600 = 350 us; span 0-1600 = 1600 us; idle 1250 us in
    two stretches: 1000 us between c (the run's last end) and e, 250 us between b and c."""
    spans = [(400, 500, "c"), (0, 100, "a"), (50, 150, "b"), (450, 460, "d"), (1500, 1600, "e")]
    idle = bench.idle_summary(spans)
    assert (idle["span_ms"], idle["busy_ms"], idle["idle_ms"]) == (1.6, 0.35, 1.25)
    assert idle["gaps"] == [{"ms": 1.0, "after": "c", "before": "e"}, {"ms": 0.25, "after": "b", "before": "c"}]
    assert bench.idle_summary([])["idle_ms"] == 0.0
