"""What an exported checkpoint tells the engines that load it (tiny Llama targets on CPU).

The aux layers: fitplan's layer i is the output of target decoder layer i. vLLM (and
speculators) count a listed id k as the INPUT of layer k, so they need i + 1 in the top-level
`eagle_aux_hidden_state_layer_ids`; SGLang adds 1 itself (set_eagle3_layers_to_capture), so
its nested `eagle_config.eagle_aux_hidden_state_layer_ids` holds i. trainer/export.py cites
the engines' code. Every expected list below is worked out by hand from that rule.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402
from test_trainer import DRAFT, TARGET, options  # noqa: E402

from fitplan.config import load_spec  # noqa: E402
from fitplan.errors import FitplanError  # noqa: E402
from fitplan.shapes import ModelShape  # noqa: E402
from trainer import checkpoint  # noqa: E402
from trainer.draft import DraftConfig  # noqa: E402
from trainer.loop import fingerprint, run  # noqa: E402

TARGET6 = {**TARGET, "num_hidden_layers": 6}
TINY = {"seq": 16, "ttt": 2, "micro_batch": 1, "attention": "eager"}
COMMAND = ["fitplan", "train", "job.yaml", "--steps", "1", "--output", "runs/x"]


@pytest.fixture(scope="module")
def configs6(tmp_path_factory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("configs6")
    (d / "config.json").write_text(json.dumps(TARGET6))  # a folder holding config.json: a base model for speculators
    (d / "draft.json").write_text(json.dumps(DRAFT))
    return str(d / "config.json"), str(d / "draft.json")


def train_one_step(configs, output: Path, **spec_changes):
    """One optimizer step and its checkpoint, under umask 077 and a known command line."""
    opts = options(configs, output, **{**TINY, **spec_changes})
    opts.steps, opts.save_every = 1, 0
    argv, umask = sys.argv, os.umask(0o077)  # what a careful user's shell has: files 0600 unless set
    sys.argv = list(COMMAND)
    try:
        report = run(opts)
    finally:
        sys.argv = argv
        os.umask(umask)
    return opts, Path(report["checkpoint"])


@pytest.fixture(scope="module")
def default6(configs6, tmp_path_factory):
    return train_one_step(configs6, tmp_path_factory.mktemp("default6") / "run")


@pytest.fixture(scope="module")
def explicit135(configs6, tmp_path_factory):
    return train_one_step(configs6, tmp_path_factory.mktemp("explicit135") / "run", aux_layers=(1, 3, 5))


def exported_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# ------------------------------------------------------------------ the keys engines read


def test_six_layer_target_default_aux_layers_in_both_numberings(default6):
    # 6 layers: SpecForge's (1, n/2 - 1, n - 4) = (1, 2, 2) repeats a layer, so shapes.py takes
    # first, middle, last = (0, 3, 5); vLLM then needs (0+1, 3+1, 5+1), SGLang (0, 3, 5)
    config = exported_config(default6[1])
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 4, 6]
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 3, 5]


def test_explicit_aux_layers_in_both_numberings(explicit135):
    config = exported_config(explicit135[1])
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 6]
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 5]


def test_four_layer_target_default(tmp_path):
    # 4 layers: (1, n/2 - 1, n - 4) = (1, 1, 0) is no choice, so first, middle, last = (0, 2, 3)
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "t.json").write_text(json.dumps(TARGET))
    (d / "d.json").write_text(json.dumps(DRAFT))
    _, folder = train_one_step((str(d / "t.json"), str(d / "d.json")), tmp_path / "run")
    config = exported_config(folder)
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 2, 3]


def test_engine_ids_pick_the_states_the_draft_trained_on():
    """A measurement, not the rule restated: what TappedTarget hands the draft for layers (1, 3, 5)
    of a 6-layer Llama against transformers' output_hidden_states, which vLLM's and speculators'
    ids index (entry 0 the embeddings, entry k the input of layer k)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from trainer.target import TappedTarget

    values = {k: v for k, v in TARGET6.items() if k not in ("model_type", "architectures")}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**values)).eval()
    layers = (1, 3, 5)
    config = DraftConfig(hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=512, draft_vocab=128,
                         target_hidden=64, aux_layers=layers).to_hf()
    ids = torch.randint(512, (1, 12), generator=torch.Generator().manual_seed(3))
    aux, _ = TappedTarget(model, layers)(ids)
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    captured = aux.split(64, dim=-1)
    vllm = config["eagle_aux_hidden_state_layer_ids"]
    sglang = config["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    assert [v + 1 for v in sglang] == vllm  # SGLang's capture adds the 1 (set_eagle3_layers_to_capture)
    n = TARGET6["num_hidden_layers"]
    for got, k in zip(captured, vllm):
        if k < n:
            assert torch.equal(got, states[k]), k
        else:  # transformers' last entry is after the final norm; the engines capture before it, as we do
            assert torch.equal(model.model.norm(got), states[n])
    # and one lower would be another layer: the off-by-one is visible
    assert not torch.equal(captured[0], states[vllm[0] - 1])



@pytest.mark.parametrize("layers,expected", [
    (3, (0, 1, 2)),  # (1, 0, -1) is no choice: first, middle, last
    (6, (0, 3, 5)),
    (7, (1, 2, 3)),  # the first depth where SpecForge's rule gives three distinct layers
    (32, (1, 15, 28)),  # Llama-3.1-8B: SGLang's default inputs (2, 16, 29) are these layers' outputs
])
def test_default_aux_layers_by_hand(layers, expected):
    assert ModelShape.default_aux_layers(SimpleNamespace(layers=layers)) == expected


def test_default_aux_layers_are_distinct_sorted_and_inside_the_target():
    for n in range(3, 200):
        got = ModelShape.default_aux_layers(SimpleNamespace(layers=n))
        assert list(got) == sorted(set(got)) and 0 <= got[0] and got[-1] < n, (n, got)


# ------------------------------------------------------------------ reading a config back


def draft_config(aux_layers) -> DraftConfig:
    return DraftConfig(hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=512, draft_vocab=128,
                       target_hidden=64, aux_layers=aux_layers, rms_eps=1e-5, rope_theta=10000.0, max_positions=256)


@pytest.mark.parametrize("layers", [(0, 3, 5), (1, 3, 5), (1, 15, 28)])
def test_from_hf_reads_back_what_to_hf_wrote(layers):
    written = json.loads(json.dumps(draft_config(layers).to_hf()))  # through JSON, as on disk
    assert DraftConfig.from_hf(written) == draft_config(layers)


def test_from_hf_reads_a_config_with_only_vllms_key_one_lower():
    written = draft_config((1, 3, 5)).to_hf()
    del written["eagle_config"]  # a speculators-style config: vLLM's numbering only
    assert written["eagle_aux_hidden_state_layer_ids"] == [2, 4, 6]
    assert DraftConfig.from_hf(written).aux_layers == (1, 3, 5)


def test_from_hf_reads_a_config_written_before_the_top_level_key():
    written = draft_config((0, 2, 3)).to_hf()
    del written["eagle_aux_hidden_state_layer_ids"]  # checkpoints of earlier fitplan versions
    assert DraftConfig.from_hf(written).aux_layers == (0, 2, 3)


@pytest.mark.parametrize("change,words", [
    (lambda c: c.update(eagle_aux_hidden_state_layer_ids=[1, 3, 5]), "disagree"),  # SGLang's ids copied as vLLM's
    (lambda c: c["eagle_config"].update(eagle_aux_hidden_state_layer_ids=[3, 3, 5]), "distinct"),
    (lambda c: c["eagle_config"].update(eagle_aux_hidden_state_layer_ids=[5, 3, 1]), "increasing"),
    (lambda c: c["eagle_config"].update(eagle_aux_hidden_state_layer_ids="1,3,5"), "list of layer indices"),
    (lambda c: (c.pop("eagle_config"), c.pop("eagle_aux_hidden_state_layer_ids")), "names no aux layers"),
])
def test_from_hf_refuses_aux_layers_it_cannot_trust(change, words):
    written = draft_config((1, 3, 5)).to_hf()
    change(written)
    with pytest.raises(FitplanError, match=words):
        DraftConfig.from_hf(written)


def test_to_hf_refuses_repeated_or_unsorted_layers():
    for layers in ((3, 3, 5), (5, 3, 1)):
        with pytest.raises(FitplanError, match="distinct and in increasing order"):
            draft_config(layers).to_hf()


# ------------------------------------------------------------------ files beside the weights


def test_exported_files_are_world_readable_under_a_strict_umask(explicit135):
    folder = explicit135[1]
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["config.json", checkpoint.RUN_RECORD, "model.safetensors", checkpoint.STATE]
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


def test_run_record_holds_the_command_and_the_job(explicit135, tmp_path):
    import yaml

    opts, folder = explicit135
    record = json.loads((folder / checkpoint.RUN_RECORD).read_text())
    assert record["command"] == COMMAND
    assert record["world"] == 1
    job_file = tmp_path / "job.yaml"  # the job, saved as a job config, is the job fitplan read
    job_file.write_text(yaml.safe_dump(record["job"]))
    assert load_spec(job_file) == opts.spec
    assert record["job"]["aux_layers"] == [1, 3, 5]
    assert record["training"] == {"lr": opts.lr, "warmup": opts.warmup, "seed": opts.seed, "data": None,
                                  "synthetic_data": True, "steps": 1}
    # the record is the resume fingerprint, split: nothing a resume checks is missing from it
    assert {**record["job"], **{k: v for k, v in record["training"].items() if k != "steps"}} == fingerprint(opts)


def test_resume_reads_folders_with_and_without_the_run_record(explicit135, tmp_path):
    import shutil

    opts, folder = explicit135
    for keep in (True, False):
        out = tmp_path / f"out-{keep}"
        shutil.copytree(folder, out / folder.name)
        if not keep:
            (out / folder.name / checkpoint.RUN_RECORD).unlink()  # a checkpoint of an earlier fitplan
        found = checkpoint.find(out, fingerprint(opts), notice=lambda line: None)
        assert found.path == out / folder.name and found.step == 1 and found.skipped == []


# ------------------------------------------------------------------ speculators


def test_speculators_converter_takes_the_export_and_its_vllm_ids(explicit135, configs6, tmp_path):
    """speculators' own Eagle3 converter (0.9.0) reads the export; its config carries the ids the
    way vLLM reads them. The converter takes the ids as an argument (it reads neither of our keys),
    so this checks that our top-level key is the one its users must pass, and that it loads our
    weights under their names."""
    converter = pytest.importorskip("speculators.convert.eagle.eagle3_converter")
    _, folder = explicit135
    ids = exported_config(folder)["eagle_aux_hidden_state_layer_ids"]
    out = tmp_path / "speculators"
    converter.Eagle3Converter().convert(folder, out, base_model=str(Path(configs6[0]).parent), validate=False,
                                        eagle_aux_hidden_state_layer_ids=ids)
    converted = json.loads((out / "config.json").read_text())
    assert converted["eagle_aux_hidden_state_layer_ids"] == [2, 4, 6]
    ours, theirs = load_file(folder / "model.safetensors"), load_file(out / "model.safetensors")
    renamed = {name.replace("midlayer.", "layers.0.", 1): t for name, t in ours.items()}  # their layer naming
    assert sorted(theirs) == sorted(renamed)
    for name, tensor in renamed.items():
        assert torch.equal(theirs[name], tensor), name
