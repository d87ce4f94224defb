"""RunSpec: YAML keys = flag names, validation without profiles, flags override the file."""

import pytest

from fitplan.config import FIELD_NAMES, RunSpec, load_spec
from fitplan.errors import FitplanError


def test_yaml_keys_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model: qwen3-8b\nmicro_batch: 2\noutput_sharding: all-to-all\naux_layers: [1, 17, 33]\n")
    spec = load_spec(path, {"micro_batch": 4, "seq": None})
    assert (spec.micro_batch, spec.output_sharding, spec.aux_layers, spec.seq) == (4, "all-to-all", (1, 17, 33), 4096)


def test_plan_file_config_section(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("fitplan_plan: 1\nconfig:\n  model: qwen3-8b\n  tp: 2\n")
    assert load_spec(path).tp == 2


@pytest.mark.parametrize(
    "values, needle",
    [
        ({"model": "x", "sead": 1}, "unknown key(s) sead"),
        ({"seq": 4}, "the target model is required"),
        ({"model": "x", "seq": 0}, "seq must be a positive integer"),
        ({"model": "x", "micro_batch": True}, "micro_batch must be a positive integer"),
        ({"model": "x", "sharding": "zero4"}, "sharding 'zero4' is not one of"),
        ({"model": "x", "offload": "params", "sharding": "zero2"}, "needs sharding zero3"),
        ({"model": "x", "global_batch": 5, "micro_batch": 2}, "not a multiple"),
        ({"model": "x", "sglang_mem_fraction": 1.5}, "sglang_mem_fraction"),
    ],
)
def test_bad_values(tmp_path, values, needle):
    path = tmp_path / "bad.yaml"
    import yaml

    path.write_text(yaml.safe_dump(values))
    with pytest.raises(FitplanError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_spec(path)


def test_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- model\n")
    with pytest.raises(FitplanError, match="expected a mapping"):
        load_spec(path)


def test_every_field_round_trips():
    spec = RunSpec(model="m", aux_layers=(1, 2, 3))
    assert set(spec.to_dict()) == set(FIELD_NAMES)
    assert spec.to_dict()["aux_layers"] == [1, 2, 3]
