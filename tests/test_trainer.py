"""The embedded Eagle3 trainer on CPU: a tiny Llama target built from a config, sdpa/eager attention."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from fitplan.config import RunSpec  # noqa: E402
from fitplan.errors import FitplanError  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from trainer import checkpoint, data, vocab  # noqa: E402
from trainer.draft import ATTENTION, DraftConfig, Eagle3Draft, _RMSNormFn, ttt_mask  # noqa: E402
from trainer.loop import run  # noqa: E402
from trainer.options import TrainOptions  # noqa: E402

TARGET = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
    max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
    initializer_range=0.5,  # a peaked random target: its next-token distributions are learnable
)
DRAFT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             vocab_size=512, draft_vocab_size=128)


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("configs")
    (d / "target.json").write_text(json.dumps(TARGET))
    (d / "draft.json").write_text(json.dumps(DRAFT))
    return str(d / "target.json"), str(d / "draft.json")


WORDS = [str(i) for i in range(40)] + ["count", "from", "to", "please", "a", "b", "c", "d"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A target directory with config.json and a word-level tokenizer with a chat template (no weights)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("model")
    (d / "config.json").write_text(json.dumps(TARGET))
    specials = ["<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", chat_template=CHAT_TEMPLATE).save_pretrained(d)
    return d


def counting_data(path: Path, bad_lines: list[str] = ()) -> Path:
    """Conversations whose replies count upwards: a structured, learnable next-token pattern."""
    lines = []
    for start in range(4):
        reply = " ".join(str(i) for i in range(start, start + 24))
        lines.append(json.dumps({"conversations": [
            {"from": "human", "value": f"count from {start}"}, {"from": "gpt", "value": reply}]}))
    path.write_text("\n".join(lines + list(bad_lines)) + "\n")
    return path


def options(configs, output: Path, **spec_changes) -> TrainOptions:
    target, draft = configs
    spec_values = dict(model=target, draft=draft, seq=32, micro_batch=2, ttt=3, tp=1, attention="sdpa")
    spec_values.update(spec_changes)
    return TrainOptions(spec=RunSpec(**spec_values), output=output, steps=6, random_weights=True,
                        synthetic_data=True, device="cpu", lr=3e-3, save_every=3)


# ------------------------------------------------------------------ pieces


def test_rmsnorm_gradient_and_value():
    torch.manual_seed(0)
    w = torch.empty(8, dtype=torch.double).uniform_(0.5, 1.5).requires_grad_()
    x = torch.randn(3, 5, 8, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFn.apply(x, w, 1e-6), (x, w))
    # x / sqrt(mean(x^2) + eps) * w, written out
    expected = x / torch.sqrt((x * x).sum(-1, keepdim=True) / 8 + 1e-6) * w
    assert torch.allclose(_RMSNormFn.apply(x, w, 1e-6), expected)


def test_ttt_mask_step0_causal_later_steps_diagonal():
    seq = 3
    q = torch.arange(seq)[:, None]
    kv = torch.arange(2 * seq)[None, :]
    expected = torch.tensor([
        [1, 0, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 1, 1, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(ttt_mask(q, kv, seq), expected)


@pytest.mark.parametrize("kernel", ["sdpa", "split"])
def test_cpu_attention_kernels_agree_with_eager(kernel):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 8)
    keys = [torch.randn(2, 2, 5, 8) for _ in range(3)]  # 3 TTT steps of 5 keys, 2 KV heads
    values = [torch.randn(2, 2, 5, 8) for _ in range(3)]
    assert torch.allclose(ATTENTION[kernel](q, keys, values, 5), ATTENTION["eager"](q, keys, values, 5), atol=1e-5)


def test_top_tokens_and_mapping():
    ids = torch.tensor([5, 5, 5, 2, 2, 7, 9])
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)  # the 9 is not a loss token
    top = vocab.top_tokens([(ids, mask)], vocab=10, draft_vocab=3)
    # counts: 5 -> 3, 2 -> 2, 7 -> 1; sorted by id
    assert top.tolist() == [2, 5, 7]
    d2t, t2d = vocab.mapping(top, 10)
    assert d2t.tolist() == [2 - 0, 5 - 1, 7 - 2]
    assert t2d.nonzero().flatten().tolist() == [2, 5, 7]


# ------------------------------------------------------------------ training runs


def test_assistant_mask_covers_the_reply_and_its_end_token(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = data.parse_line(json.dumps({"messages": [
        {"role": "user", "content": "a b"}, {"role": "assistant", "content": "c d"}]}))
    ids, mask = data.tokenize(messages, tokenizer, max_length=64)
    words = tokenizer.convert_ids_to_tokens(ids.tolist())
    assert words == ["<|user|>", "a", "b", "<|end|>", "<|assistant|>", "c", "d", "<|end|>"]
    assert [w for w, m in zip(words, mask.tolist()) if m] == ["c", "d", "<|end|>"]
    ids, mask = data.tokenize(messages, tokenizer, max_length=6)  # truncation keeps the first 6
    assert len(ids) == 6 and mask.tolist() == [False] * 5 + [True]


@pytest.mark.parametrize("line", [
    "not json", "[1, 2]", json.dumps({"conversations": [{"from": "human", "value": "hi"}]}),
    json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}),
    json.dumps({"text": "no turns"}),
])
def test_unusable_lines_are_rejected(line):
    assert data.parse_line(line) is None


def test_bad_lines_are_skipped_and_counted_all_bad_is_an_error(model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    loaded = data.load_jsonl(counting_data(tmp_path / "d.jsonl", ["{broken", '{"messages": []}']), tokenizer, 64)
    assert (len(loaded.samples), loaded.skipped) == (4, 2)
    (tmp_path / "bad.jsonl").write_text("{broken\n[]\n")
    with pytest.raises(FitplanError, match="no usable line"):
        data.load_jsonl(tmp_path / "bad.jsonl", tokenizer, 64)


def test_loss_decreases_on_structured_data(model_dir, tmp_path):
    spec = RunSpec(model=str(model_dir), draft=str(model_dir.parent / "draft.json"), seq=64, micro_batch=2,
                   ttt=3, tp=1, attention="eager")
    (model_dir.parent / "draft.json").write_text(json.dumps(DRAFT))
    opts = TrainOptions(spec=spec, output=tmp_path / "run", steps=16, data=counting_data(tmp_path / "d.jsonl"),
                        random_weights=True, device="cpu", lr=1e-2)
    report = run(opts)
    losses = [s["loss"] for s in report["steps"]]
    # the four conversations come round every two steps: a draft that learns halves its loss
    assert sum(losses[-2:]) / 2 < 0.5 * sum(losses[:2]) / 2, losses
    assert report["steps"][-1]["acc"][0] > report["steps"][0]["acc"][0]
    assert report["skipped_lines"] == 0


def test_resume_continues_with_identical_loss(configs, tmp_path):
    full = run(options(configs, tmp_path / "full"))
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "step-000003", resumed_dir / "step-000003")
    opts = options(configs, resumed_dir)
    opts.resume = True
    resumed = run(opts)
    assert [s["step"] for s in resumed["steps"]] == [4, 5, 6]
    assert [s["loss"] for s in resumed["steps"]] == [s["loss"] for s in full["steps"][3:]]


def test_resume_from_another_config_is_a_one_line_error(configs, tmp_path):
    run(options(configs, tmp_path / "a"))
    opts = options(configs, tmp_path / "a", ttt=2)
    opts.resume = True
    with pytest.raises(FitplanError, match="ttt"):
        run(opts)


def test_export_reloads_with_matching_outputs(configs, tmp_path):
    report = run(options(configs, tmp_path / "run"))
    exported = Path(report["checkpoint"])
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["draft_vocab_size"] == 128
    weights = load_file(exported / "model.safetensors")
    assert {"d2t", "t2d", "fc.weight", "lm_head.weight", "embed_tokens.weight", "midlayer.self_attn.q_proj.weight"} <= set(weights)
    assert weights["lm_head.weight"].shape == (128, 64)
    # the d2t offsets point at the target ids the t2d mask keeps
    assert torch.equal(torch.arange(128) + weights["d2t"], weights["t2d"].nonzero().flatten())

    torch.manual_seed(1)
    aux = torch.randn(1, 16, 3 * 64, dtype=torch.bfloat16)
    ids = torch.randint(512, (1, 16 + 2))
    outputs = []
    for _ in range(2):
        with torch.device("cpu"):
            draft = Eagle3Draft(DraftConfig.from_hf(config), "eager").to(torch.bfloat16)
        checkpoint.load_export(exported, draft)
        outputs.append([t.detach() for t in draft.unroll(aux, ids, 2)])
        if len(outputs) == 1:  # a second, differently initialised copy must load to the same function
            torch.manual_seed(2)
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


def test_flex_on_cpu_is_a_clean_error(configs, tmp_path):
    with pytest.raises(FitplanError, match="flex"):
        run(options(configs, tmp_path / "run", attention="flex"))


# ------------------------------------------------------------------ the command line


def test_cli_bad_input_is_exit_code_2_without_traceback(configs, tmp_path):
    from typer.testing import CliRunner

    from fitplan.cli import app

    target, draft = configs
    runner = CliRunner()
    no_data = runner.invoke(app, ["train", "--model", target, "--device", "cpu", "-o", str(tmp_path / "a")])
    assert no_data.exit_code == 2 and "--synthetic-data" in no_data.output
    missing_gpus = runner.invoke(app, ["train", "--model", target, "--synthetic-data", "--random-weights",
                                       "--gpus", "8xH100", "-o", str(tmp_path / "b")])
    if not torch.cuda.is_available():
        assert missing_gpus.exit_code == 2 and "8xH100" in missing_gpus.output
    assert "Traceback" not in no_data.output + missing_gpus.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing half-written


def test_cli_trains_and_writes_a_report(configs, tmp_path):
    from typer.testing import CliRunner

    from fitplan.cli import app

    target, draft = configs
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "train", "--model", target, "--draft", draft, "--random-weights", "--synthetic-data", "--device", "cpu",
        "--attention", "eager", "--seq", "16", "--ttt", "2", "--tp", "1", "--steps", "2", "-o", str(out), "--json",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [s["step"] for s in report["steps"]] == [1, 2]
    assert json.loads((out / "report.json").read_text())["steps"][1]["loss"] == report["steps"][1]["loss"]
    assert (out / "step-000002" / "model.safetensors").is_file()


def test_sigterm_saves_a_checkpoint_and_stops(configs, tmp_path):
    import os
    import signal
    import threading

    opts = options(configs, tmp_path / "run")
    opts.steps, opts.save_every = 500, 0
    threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    report = run(opts)
    stopped = report["stopped_at"]
    assert stopped < 500 and [s["step"] for s in report["steps"]][-1] == stopped
    assert (tmp_path / "run" / f"step-{stopped:06d}" / "training_state.pt").is_file()


def test_auto_picks_a_fitting_plan_with_the_same_global_batch():
    from fitplan.commands.train import choose_spec
    from fitplan.estimator import estimate_spec

    flags = {"model": "llama-3.1-8b", "gpus": "1xH100", "seq": 32768, "micro_batch": 4}
    assert not estimate_spec(RunSpec(**flags)).fits  # the starting point does not fit ...
    spec = choose_spec(None, None, True, flags)
    assert estimate_spec(spec).fits  # ... the plan does, and trains on as many samples per step
    assert spec.micro_batch * spec.accum == 4 and spec.seq == 32768


def test_model_directory_without_weights_or_tokenizer_is_a_clean_error(tmp_path):
    from trainer.target import load_target, load_tokenizer

    (tmp_path / "config.json").write_text(json.dumps(TARGET))
    with pytest.raises(FitplanError, match="no weights"):
        load_target(str(tmp_path), random_weights=False, device=torch.device("cpu"))
    with pytest.raises(FitplanError, match="tokenizer"):
        load_tokenizer(str(tmp_path))


def test_gradient_accumulation_takes_accum_micro_batches_per_step(configs, tmp_path):
    opts = options(configs, tmp_path / "run", micro_batch=1, accum=3)
    opts.steps, opts.save_every = 2, 0
    report = run(opts)
    assert [s["tokens"] for s in report["steps"]] == [3 * 32, 3 * 32]  # 3 micro-batches of 1 x 32 tokens


@pytest.mark.parametrize("attention", ["split", "sdpa"])
def test_every_rope_call_of_the_draft_fits_the_triton_kernel(configs, tmp_path, monkeypatch, attention):
    """On CUDA the draft's RoPE takes trainer/rope_kernel.py only for shapes it `fits`, else falls
    back silently to the compiled one: the draft's own q, k and tables must fit it."""
    pytest.importorskip("triton")
    import trainer.draft as draft
    from trainer.rope_kernel import fits

    calls = []

    def recording_kernel(device_type):
        def apply_rope(x, cos, sin):
            calls.append(fits(x, cos, sin))
            return draft._apply_rope(x, cos, sin)
        return apply_rope

    monkeypatch.setattr(draft, "rope_kernel", recording_kernel)
    opts = options(configs, tmp_path / "run", attention=attention)
    opts.steps = 1
    run(opts)
    assert calls and all(calls)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel", ["flex", "split"])
def test_fused_kernels_match_eager_with_gradients_on_gpu(kernel):
    torch.manual_seed(0)
    # seq 384 = 3 flex blocks, 3 TTT steps' keys: full, partial and empty tiles all occur; split's
    # causal kernel is cuDNN's on Hopper
    q = torch.randn(2, 4, 384, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 2, 3 * 384, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 2, 3 * 384, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    outs, grads = [], []
    for name in (kernel, "eager"):
        out = ATTENTION[name](q, list(k.split(384, dim=2)), list(v.split(384, dim=2)), 384)
        outs.append(out.float())
        grads.append(torch.autograd.grad(out.float().square().sum(), (q, k, v)))
    assert torch.allclose(outs[0], outs[1], atol=2e-2, rtol=2e-2)
    for a, b in zip(*grads):
        assert torch.allclose(a.float(), b.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("precision", ["mixed", "fp32-autocast", "bf16"])
def test_other_precision_recipes_resume_identically(configs, tmp_path, precision):
    full = run(options(configs, tmp_path / "full", precision=precision, attention="eager"))
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "step-000003", tmp_path / "resumed" / "step-000003")
    opts = options(configs, tmp_path / "resumed", precision=precision, attention="eager")
    opts.resume = True
    assert [s["loss"] for s in run(opts)["steps"]] == [s["loss"] for s in full["steps"][3:]]


def test_mixed_keeps_fp32_gradients_only_on_the_masters():
    from trainer.optim import build_optimizer

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3, bias=False).to(torch.bfloat16)
    opt = build_optimizer(list(layer.parameters()), "mixed", lr=0.1)
    for _ in range(2):  # two accumulated micro-steps
        layer(torch.ones(2, 4, dtype=torch.bfloat16)).sum().backward()
    assert layer.weight.grad is None
    (master,) = opt.grad_tensors()
    # d(sum(W x))/dW = sum over the 2 rows of x = 2 per entry, twice accumulated = 4
    assert master.grad.dtype == torch.float32 and torch.equal(master.grad, torch.full((3, 4), 4.0))


def test_cli_trains_a_plan_file(configs, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from fitplan.cli import app

    target, draft = configs
    config = dict(model=target, draft=draft, seq=16, micro_batch=1, ttt=2, tp=1, accum=1, attention="eager")
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"fitplan_plan": 1, "config": config, "prediction": {}, "trail": []}))
    result = CliRunner().invoke(app, ["train", "--plan", str(plan), "--random-weights", "--synthetic-data",
                                      "--device", "cpu", "--steps", "1", "-o", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["config"]["seq"] == 16 and report["config"]["ttt"] == 2
