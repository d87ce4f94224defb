"""The disk and generation time of an offline run's features (`fitplan estimate --samples N`,
`--samples-from FILE.jsonl`).

Expected figures are worked out by hand below from what SpecForge's prepare_hidden_states.py
stores per sample (aux states [N, 3h] and last hidden state [N, h] in bf16, input_ids and
loss_mask [N] in int64, one torch.save file each), and checked against torch.save itself where
torch is installed.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from fitplan.cli import app
from fitplan.config import RunSpec
from fitplan.layout import resolve
from fitplan.offline_features import (
    FILE_OVERHEAD_BYTES,
    bytes_per_token,
    estimate_features,
    lengths_from_jsonl,
    lengths_from_samples,
    sample_bytes,
)
from fitplan.profiles import load_model

OFFLINE = ["--runtime", "specforge", "--offline"]


def run(*args):
    return CliRunner().invoke(app, list(args))


def features_json(*args):
    r = run("estimate", *args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["features"]


# ----------------------------------------------------------------------------- bytes


def test_bytes_per_token_by_hand():
    # llama-3.1-8b, h = 4096: aux 3 x 4096 x 2 = 24,576 + last hidden 4096 x 2 = 8,192 + input_ids 8 + loss_mask 8
    assert bytes_per_token(load_model("llama-3.1-8b")) == 24_576 + 8_192 + 8 + 8 == 32_784
    # llama-3.1-70b, h = 8192: 3 x 8192 x 2 + 8192 x 2 + 16
    assert bytes_per_token(load_model("llama-3.1-70b")) == 49_152 + 16_384 + 16 == 65_552


def test_sample_bytes_match_torch_save():
    """The format's own bytes: a record written by torch.save is within 64 B of the model's."""
    torch = pytest.importorskip("torch")
    m = load_model("llama-3.2-1b")  # h = 2048: a record of 100 tokens is 1.6 MB
    n, h = 100, m.hidden
    record = {
        "input_ids": torch.zeros(n, dtype=torch.long),
        "loss_mask": torch.zeros(n, dtype=torch.long),
        "aux_hidden_state": torch.zeros(1, n, 3 * h, dtype=torch.bfloat16),
        "hidden_state": torch.zeros(1, n, h, dtype=torch.bfloat16),
    }
    buffer = io.BytesIO()
    torch.save(record, buffer)
    written = len(buffer.getvalue())
    assert sample_bytes(m, n) - 128 <= written <= sample_bytes(m, n)


def test_samples_at_seq_by_hand():
    f = features_json("--model", "llama-3.1-8b", "--gpus", "8xH100", *OFFLINE, "--seq", "4096", "--samples", "68000")
    per_sample = 4096 * 32_784 + FILE_OVERHEAD_BYTES  # 134,283,264 + the file's container
    assert f["bytes_per_token"] == 32_784
    assert f["bytes_per_sample"] == per_sample
    assert f["samples"] == 68_000
    assert f["total_bytes"] == 68_000 * per_sample  # 9.13 TB
    assert f["stored_tokens"] == 68_000 * 4096
    assert any("over 1 TB" in note for note in f["notes"])


def test_generation_time_by_hand():
    """llama-3.1-8b: 8,030,261,248 parameters (Meta's model card: 8.03 B), of which the embedding
    and the untied lm_head are 128,256 x 4096 each. A capture multiplies through everything but
    those two: 8,030,261,248 - 2 x 525,336,576 = 6,979,588,096. At 4096 tokens:
    2 x 6,979,588,096 x 4096 plus causal attention 32 layers x 2 x 4096^2 x 32 heads x 128.
    H100 SXM bf16 dense peak 989.4 TFLOPs (NVIDIA's datasheet); 8 GPUs at 42%."""
    per_sample = 2 * 6_979_588_096 * 4096 + 32 * 2 * 4096**2 * 32 * 128
    expected = 1000 * per_sample / (8 * 989.4e12 * 0.42)
    f = features_json("--model", "llama-3.1-8b", "--gpus", "8xH100", *OFFLINE, "--seq", "4096", "--samples", "1000")
    assert f["generation_seconds"] == pytest.approx(expected, rel=1e-6)
    assert "a model" in f["assumed"]["generation_time"]


# ----------------------------------------------------------------------------- a JSONL's lengths


def write_jsonl(path, lines):
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


def sharegpt(user_chars: int, reply_chars: int) -> dict:
    return {"conversations": [{"from": "human", "value": "x" * user_chars}, {"from": "gpt", "value": "y" * reply_chars}]}


def test_jsonl_lengths_padding_and_truncation(tmp_path):
    """40 conversations: a user turn of 40(i+1) ASCII characters and a 400-character reply.
    Approximate tokens: ceil(bytes / 4) + 5 a message = 10(i+1) + 5 + 100 + 5 = 10(i+1) + 110.
    Batches of 32 in file order are stored at their longest: samples 0-31 at 430 (i = 31),
    32-39 at 510 (i = 39): 32 x 430 + 8 x 510 = 17,840 tokens; before padding
    sum(10(i+1) + 110) = 8,200 + 4,400 = 12,600."""
    path = write_jsonl(tmp_path / "c.jsonl", [sharegpt(40 * (i + 1), 400) for i in range(40)] + [""])
    lengths = lengths_from_jsonl(path, seq=4096)
    assert lengths.stored == {430: 32, 510: 8}
    assert lengths.content_tokens == 12_600
    # data.max_length 450 truncates the longer ones first: batch 1 at min(430, 450), batch 2 at 450
    short = lengths_from_jsonl(path, seq=450)
    assert short.stored == {430: 32, 450: 8}
    # --samples 10: the first ten, as SpecForge's --num-samples takes them: one batch at 10 x 10 + 110
    assert lengths_from_jsonl(path, seq=4096, samples=10).stored == {210: 10}


def test_jsonl_totals_through_the_cli(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [sharegpt(40 * (i + 1), 400) for i in range(40)])
    f = features_json("--model", "llama-3.1-8b", *OFFLINE, "--samples-from", str(path))
    assert f["samples"] == 40
    assert f["stored_tokens"] == 17_840
    assert f["total_bytes"] == 17_840 * 32_784 + 40 * FILE_OVERHEAD_BYTES
    assert "approximate" in f["assumed"]["lengths"]


def test_messages_format_and_a_local_tokenizer(tmp_path):
    """With a tokenizer.json the counts are the tokenizer's: a word-level one counts words."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = tokenizers.Tokenizer(WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    messages = {"messages": [{"role": "user", "content": "one two three"},
                             {"role": "assistant", "content": [{"type": "text", "text": "four five"}]}]}
    path = write_jsonl(tmp_path / "m.jsonl", [messages])
    lengths = lengths_from_jsonl(path, seq=4096, tokenizer=tmp_path / "tokenizer.json")
    assert lengths.stored == {3 + 5 + 2 + 5: 1}  # words + 5 template tokens a message
    assert "tokenizer" in lengths.source


def test_samples_only_is_an_upper_bound():
    lengths = lengths_from_samples(5, 2048)
    assert lengths.stored == {2048: 5} and "upper bound" in lengths.source


def test_an_online_job_says_it_stores_no_features():
    job = resolve(RunSpec(model="llama-3.1-8b"))  # fitplan's trainer runs the target live
    f = estimate_features(job, lengths_from_samples(10, 4096))
    assert any("stores none" in note for note in f.notes)
    assert f.total_bytes < 10**12 and not any("1 TB" in note for note in f.notes)


def test_a_specforge_run_config_stores_features_only_offline(tmp_path):
    """data.max_length is the seq; an online (disaggregated) run's capture servers stream the states."""
    from test_specforge_yaml import DISAGGREGATED_YAML, OFFLINE_YAML

    offline, online = tmp_path / "off.yaml", tmp_path / "on.yaml"
    offline.write_text(OFFLINE_YAML)  # data.max_length 4096, Qwen3-8B (h 4096)
    online.write_text(DISAGGREGATED_YAML)  # data.max_length 8192
    f = features_json(str(offline), "--samples", "100")
    assert f["stored_tokens"] == 100 * 4096 and f["notes"] == []
    g = features_json(str(online), "--samples", "100")
    assert g["stored_tokens"] == 100 * 8192 and any("stores none" in note for note in g["notes"])


def test_the_table_shows_the_block(tmp_path):
    r = run("estimate", "--model", "llama-3.1-8b", *OFFLINE, "--samples", "100")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # the console wraps long lines
    assert "offline features" in text and "32,784 B per token" in text
    assert "13.43 GB on disk" in text  # 100 x (4096 x 32,784 + 2,317) = 13,428,557,100 B
    assert "a model" in text


def test_feature_flags_keep_torch_out():
    code = textwrap.dedent(
        """
        import sys
        from typer.testing import CliRunner
        from fitplan.cli import app
        r = CliRunner().invoke(app, ["estimate", "--model", "llama-3.1-8b", "--runtime", "specforge", "--offline",
                                     "--samples", "10", "--json"])
        assert r.exit_code == 0, r.output
        print(",".join(sorted(m for m in ("torch", "transformers") if m in sys.modules)))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
