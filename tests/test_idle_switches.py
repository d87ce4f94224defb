"""A layout switch turned on where it has nothing to do is refused, not ignored.

optimizer_per_param steps the fp32 copies fitplan's trainer makes of every gradient under
bf16-master with the optimizer on the GPU and whole masters (split_master false, swept so here);
split_master splits those masters where AdamW steps them on the GPU; sum_step_grads sums the TTT steps' gradients in the
eagle3 lean draft's fused functions, not under mixed. Both default to auto (None): on where they
apply. Swept over every layout axis that decides where they apply: true is accepted exactly where
it applies and refused in one line naming the switch everywhere else; false and auto are
accepted wherever the layout is. draft_memory lays out the draft of fitplan's eagle3 trainer and
recompute_norms its lean draft's norms: both auto by default (lean, on), draft_memory given
(lean or plain) and recompute_norms true are refused alike where there is no such draft. The
expected rules are written out here, not read from fitplan.layout.
"""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from fitplan.cli import app
from fitplan.config import RunSpec, spec_from_mapping
from fitplan.errors import FitplanError
from fitplan.ladder import fit
from fitplan.layout import (
    fused_norms,
    head_grads_in_forward,
    lean_draft,
    projects_embedding_once,
    resolve,
    splits_master,
    steps_per_param,
    sums_step_grads,
)
from fitplan.records import measurement_from_mapping, plan_from_mapping
from test_job_rules import refusals_by_command

RUNTIMES = ("fitplan", "specforge", "speculators")
WORKLOADS = ("eagle3", "sft")
PRECISIONS = ("mixed", "fp32-autocast", "bf16-master", "bf16")
OFFLOADS = ("none", "optimizer")
DRAFT_MEMORIES = (None, "lean", "plain")
RECOMPUTE_NORMS = (None, True, False)
# What speculators' train.py must be told whatever the layout (fitplan.layout.SPECULATORS_KNOBS).
SPECULATORS = {"offline": True, "sharding": "none"}


def layouts():
    return itertools.product(RUNTIMES, WORKLOADS, PRECISIONS, OFFLOADS, DRAFT_MEMORIES, RECOMPUTE_NORMS)


def layout_spec(runtime, workload, precision, offload, draft_memory, recompute_norms, **switch) -> RunSpec:
    extra = SPECULATORS if runtime == "speculators" else {}
    return RunSpec(model="llama-3.1-8b", gpus="1xH100", seq=2048, runtime=runtime, workload=workload,
                   precision=precision, offload=offload, draft_memory=draft_memory,
                   recompute_norms=recompute_norms, **extra, **switch)


def per_param_applies(runtime, workload, precision, offload, draft_memory, recompute_norms) -> bool:
    return runtime == "fitplan" and precision == "bf16-master" and offload == "none"


# the sweep's optimizer is AdamW, which split_master steps wherever fp32 masters are on the GPU
split_applies = per_param_applies


def draft_applies(runtime, workload, precision, offload, draft_memory, recompute_norms) -> bool:
    return runtime == "fitplan" and workload == "eagle3"


def norms_apply(runtime, workload, precision, offload, draft_memory, recompute_norms) -> bool:
    return runtime == "fitplan" and workload == "eagle3" and draft_memory != "plain"


def step_sums_apply(runtime, workload, precision, offload, draft_memory, recompute_norms) -> bool:
    return (runtime == "fitplan" and workload == "eagle3" and draft_memory != "plain" and recompute_norms is not False
            and precision != "mixed")


SWITCHES = {
    "optimizer_per_param": (per_param_applies, lambda job: steps_per_param(job.spec)),
    "split_master": (split_applies, lambda job: splits_master(job.spec)),
    "sum_step_grads": (step_sums_apply, sums_step_grads),
    # the head's gradients go into the steps' sums: it acts wherever they are made
    "head_grad_in_forward": (step_sums_apply, head_grads_in_forward),
    # the embedding half's weight gradients go into those sums too (the sweep's 7 TTT steps)
    "project_embedding_once": (step_sums_apply, projects_embedding_once),
}
# What each switch is swept with: a copy of every gradient, which split masters do without.
ALONGSIDE = {"optimizer_per_param": {"split_master": False}}


def switched(layout: tuple, switch: str, value) -> RunSpec:
    return layout_spec(*layout, **{switch: value, **ALONGSIDE.get(switch, {})})


def accepted_layouts() -> list[tuple]:
    """The layouts the rules accept with the switches left to auto."""
    kept = []
    for layout in layouts():
        try:
            resolve(layout_spec(*layout))
        except FitplanError:
            continue
        kept.append(layout)
    return kept


def test_the_sweep_covers_layouts_where_each_switch_applies_and_where_it_does_not():
    kept = accepted_layouts()
    # fitplan eagle3: 4 precisions x 2 offloads x (auto and lean drafts x 3 norm settings, plain
    # with norms auto or false) = 8 x 8 = 64; fitplan sft: draft auto, norms auto or false: 8 x 2
    # = 16; specforge and speculators: eagle3, their one precision, no offload, x 1 x 2 = 2 each
    assert len(kept) == 64 + 16 + 2 + 2
    # fitplan, bf16-master, offload none: eagle3 8 draft and norm settings, sft 2
    assert sum(per_param_applies(*layout) for layout in kept) == 8 + 2
    # fitplan, eagle3, auto or lean draft, norms auto or true: 3 precisions other than mixed x 2
    # offloads x 2 x 2
    assert sum(step_sums_apply(*layout) for layout in kept) == 24


def refusal(spec: RunSpec, switch: str) -> str:
    """The rules' refusal of `spec`: one line, naming `switch` first."""
    with pytest.raises(FitplanError) as refused:
        resolve(spec)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{switch}: "), message
    return message


@pytest.mark.parametrize("switch", SWITCHES)
def test_true_is_accepted_where_the_switch_applies_and_refused_in_one_line_elsewhere(switch):
    applies, acts = SWITCHES[switch]
    for layout in accepted_layouts():
        spec = switched(layout, switch, True)
        if applies(*layout):
            assert acts(resolve(spec)), layout
            continue
        message = refusal(spec, switch)
        assert f"(accepted: {switch} false or auto, or " in message, message


@pytest.mark.parametrize("switch", SWITCHES)
def test_false_and_auto_are_accepted_wherever_the_layout_is(switch):
    applies, acts = SWITCHES[switch]
    for layout in accepted_layouts():
        assert not acts(resolve(switched(layout, switch, False))), layout
        auto = acts(resolve(switched(layout, switch, None)))
        # auto: on where it applies, except the bf16-master step of sft, a parameter at a time
        # only when asked (an sft model's hundreds of tensors cost one optimizer call each)
        sft_step = switch == "optimizer_per_param" and layout[1] == "sft"
        assert auto == (applies(*layout) and not sft_step), layout


def test_the_refusal_names_the_knob_that_rules_the_switch_out():
    line = "precision mixed (accepted: sum_step_grads false or auto, or runtime fitplan, workload eagle3, " \
           "draft_memory lean or auto, recompute_norms true or auto, precision other than mixed, GPUs 1)"
    with pytest.raises(FitplanError, match=r"^sum_step_grads: .*, not with " + line.replace("(", r"\(").replace(")", r"\)")):
        resolve(layout_spec("fitplan", "eagle3", "mixed", "none", "lean", True, sum_step_grads=True))
    line = "offload optimizer (accepted: optimizer_per_param false or auto, or runtime fitplan, " \
           "precision bf16-master, offload none, split_master false)"
    with pytest.raises(FitplanError, match=r"^optimizer_per_param: .*, not with " + line.replace("(", r"\(").replace(")", r"\)")):
        resolve(layout_spec("fitplan", "eagle3", "bf16-master", "optimizer", "lean", True, optimizer_per_param=True))


def auto_layouts() -> list[tuple]:
    """The accepted layouts with draft_memory and recompute_norms left to auto."""
    return [layout for layout in accepted_layouts() if layout[4] is None and layout[5] is None]


def test_draft_memory_given_is_accepted_where_fitplan_runs_an_eagle3_draft_and_refused_elsewhere():
    kept = auto_layouts()
    # fitplan: 2 workloads x 4 precisions x 2 offloads; specforge and speculators: 1 each
    assert len(kept) == 16 + 1 + 1 and sum(draft_applies(*layout) for layout in kept) == 8
    for layout in kept:
        assert lean_draft(resolve(layout_spec(*layout)).spec) == draft_applies(*layout), layout
        for given in ("lean", "plain"):
            spec = layout_spec(*layout[:4], given, None)
            if draft_applies(*layout):
                assert lean_draft(resolve(spec).spec) == (given == "lean"), layout
                continue
            message = refusal(spec, "draft_memory")
            assert message.endswith("(accepted: draft_memory auto, or runtime fitplan, workload eagle3)"), message


def test_recompute_norms_true_is_accepted_where_the_draft_is_lean_and_refused_elsewhere():
    kept = [layout for layout in accepted_layouts() if layout[5] is None]
    # the auto layouts above and fitplan eagle3's lean and plain drafts: 18 + 8 + 8
    assert len(kept) == 18 + 16 and sum(norms_apply(*layout) for layout in kept) == 16
    for layout in kept:
        assert fused_norms(resolve(layout_spec(*layout))) == norms_apply(*layout), layout
        assert not fused_norms(resolve(layout_spec(*layout[:5], False))), layout
        spec = layout_spec(*layout[:5], True)
        if norms_apply(*layout):
            assert fused_norms(resolve(spec)), layout
            continue
        message = refusal(spec, "recompute_norms")
        assert "(accepted: recompute_norms false or auto, or runtime fitplan, workload eagle3, " \
               "draft_memory lean or auto)" in message, message


# ---------------------------------------------------------------- every command, the command line

# Jobs train can run (eagle3, fitplan's runtime) in which a switch does nothing, with the knob named.
IDLE = [
    (["--precision", "mixed", "--sum-step-grads"], "sum_step_grads", "precision mixed"),
    (["--draft-memory", "plain", "--sum-step-grads"], "sum_step_grads", "draft_memory plain"),
    (["--no-recompute-norms", "--sum-step-grads"], "sum_step_grads", "recompute_norms false"),
    (["--precision", "mixed", "--head-grad-in-forward"], "head_grad_in_forward", "precision mixed"),
    (["--no-sum-step-grads", "--head-grad-in-forward"], "head_grad_in_forward", "sum_step_grads false"),
    (["--precision", "mixed", "--project-embedding-once"], "project_embedding_once", "precision mixed"),
    (["--no-sum-step-grads", "--project-embedding-once"], "project_embedding_once", "sum_step_grads false"),
    (["--precision", "mixed", "--optimizer-per-param"], "optimizer_per_param", "precision mixed"),
    (["--precision", "bf16", "--optimizer-per-param"], "optimizer_per_param", "precision bf16"),
    (["--offload", "optimizer", "--optimizer-per-param"], "optimizer_per_param", "offload optimizer"),
    (["--draft-memory", "plain", "--recompute-norms"], "recompute_norms", "draft_memory plain"),
]
YAML_VALUES = {"--precision": ("precision", str), "--draft-memory": ("draft_memory", str),
               "--workload": ("workload", str), "--runtime": ("runtime", str), "--recompute-norms": ("recompute_norms", True),
               "--offline": ("offline", True), "--sharding": ("sharding", str),
               "--offload": ("offload", str), "--no-recompute-norms": ("recompute_norms", False),
               "--sum-step-grads": ("sum_step_grads", True), "--optimizer-per-param": ("optimizer_per_param", True),
               "--no-sum-step-grads": ("sum_step_grads", False), "--head-grad-in-forward": ("head_grad_in_forward", True),
               "--project-embedding-once": ("project_embedding_once", True)}


def as_yaml(flags: list[str]) -> dict:
    keys, rest = {"model": "llama-3.1-8b"}, list(flags)
    while rest:
        key, value = YAML_VALUES[rest.pop(0)]
        keys[key] = rest.pop(0) if value is str else value
    return keys


def refusals(tmp_path, flags: list[str]) -> dict[str, str]:
    """Each command's one-line refusal of the job `flags` (train's with nothing written)."""
    return refusals_by_command(tmp_path, ["--model", "llama-3.1-8b", *flags], as_yaml(flags))


@pytest.mark.parametrize("flags,switch,knob", IDLE)
def test_every_command_refuses_an_idle_switch_alike_before_anything_loads(tmp_path, flags, switch, knob):
    lines = refusals(tmp_path, flags)
    reasons = {line.split(": ", 1)[1] for line in lines.values()}
    assert len(reasons) == 1, lines
    assert reasons.pop().startswith(f"{switch}: ") and all(f"not with {knob} (" in line for line in lines.values())


SPECULATORS_FLAGS = ["--runtime", "speculators", "--precision", "fp32-autocast", "--offline", "--sharding", "none"]
# Jobs with no draft of fitplan's eagle3 trainer (train runs none of them: it says so first),
# the flags of the job and of the knob given in it apart.
NO_TRAINER_DRAFT = [
    (["--workload", "sft"], ["--draft-memory", "plain"], "draft_memory", "workload sft"),
    (["--workload", "sft"], ["--draft-memory", "lean"], "draft_memory", "workload sft"),
    (["--workload", "sft"], ["--recompute-norms"], "recompute_norms", "workload sft"),
    (["--runtime", "specforge"], ["--draft-memory", "plain"], "draft_memory", "runtime specforge"),
    (["--runtime", "specforge"], ["--recompute-norms"], "recompute_norms", "runtime specforge"),
    (SPECULATORS_FLAGS, ["--draft-memory", "lean"], "draft_memory", "runtime speculators"),
    (SPECULATORS_FLAGS, ["--recompute-norms"], "recompute_norms", "runtime speculators"),
]


@pytest.mark.parametrize("job,given,switch,knob", NO_TRAINER_DRAFT)
def test_every_planning_command_refuses_a_draft_knob_without_fitplans_draft_alike(tmp_path, job, given, switch,
                                                                                    knob):
    assert CliRunner().invoke(app, ["estimate", "--model", "llama-3.1-8b", *job]).exit_code == 0  # the job alone
    lines = refusals(tmp_path, job + given)
    assert "fitplan train runs" in lines.pop("train")  # a job train never runs, refused as such
    reasons = {line.split(": ", 1)[1] for line in lines.values()}
    assert len(reasons) == 1, lines
    assert reasons.pop().startswith(f"{switch}: ") and all(f"not with {knob} (" in line for line in lines.values())


@pytest.mark.parametrize("flags,switch", [(["--precision", "mixed", "--sum-step-grads"], "sum_step_grads"),
                                          (["--offload", "optimizer", "--optimizer-per-param"], "optimizer_per_param"),
                                          (["--workload", "sft", "--draft-memory", "lean"], "draft_memory"),
                                          (["--runtime", "specforge", "--recompute-norms"], "recompute_norms")])
def test_the_cli_process_exits_2_with_one_line_on_stderr(flags, switch):
    done = subprocess.run([sys.executable, "-m", "fitplan.cli", "estimate", "--model", "llama-3.1-8b", *flags],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {switch}: "), done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------- auto through files, and fit


def test_auto_round_trips_through_yaml_plans_and_reports():
    spec = RunSpec(model="llama-3.1-8b", precision="mixed")
    auto = ("sum_step_grads", "optimizer_per_param", "draft_memory", "recompute_norms", "project_embedding_once")
    assert all(getattr(spec, key) is None for key in auto)
    written = yaml.safe_load(yaml.safe_dump(spec.to_dict()))
    assert all(written[key] is None for key in auto)
    assert spec_from_mapping(written) == spec
    plan = plan_from_mapping({"fitplan_plan": 1, "config": written}, "plan.yaml")
    assert plan.config == spec
    report = measurement_from_mapping({"config": written, "steps": []}, "report.json")
    # reports name the attention they ran; one without it ran flex, the eagle3 default of its time
    assert report.config == spec.replace(attention="flex")
    named = measurement_from_mapping({"config": {**written, "attention": "split"}, "steps": []}, "report.json")
    assert named.config == spec.replace(attention="split")


def test_files_written_while_sum_step_grads_was_a_plain_switch_read_as_auto():
    # every plan and report then held its default, true, also where it did nothing (mixed)
    old = {**RunSpec(model="llama-3.1-8b", precision="mixed").to_dict(), "sum_step_grads": True}
    plan = plan_from_mapping({"fitplan_plan": 1, "config": old}, "plan.yaml")
    report = measurement_from_mapping({"config": old, "steps": []}, "report.json")
    for spec in (plan.config, report.config):
        assert spec.sum_step_grads is None and not sums_step_grads(resolve(spec))
    # a report predating the key ran one gradient per step
    del old["sum_step_grads"]
    assert measurement_from_mapping({"config": old, "steps": []}, "report.json").config.sum_step_grads is False


def test_files_written_while_the_draft_knobs_had_plain_defaults_read_as_auto():
    # then every file held draft_memory lean and recompute_norms true, also for sft and SpecForge;
    # speculators' jobs held draft_memory plain, and a report predating the keys holds plain, false
    for layout in ({"workload": "sft"}, {"runtime": "specforge"}):
        old = {**RunSpec(model="llama-3.1-8b", **layout).to_dict(), "draft_memory": "lean", "recompute_norms": True}
        for spec in (plan_from_mapping({"fitplan_plan": 1, "config": old}, "plan.yaml").config,
                     measurement_from_mapping({"config": old, "steps": []}, "report.json").config):
            assert spec.draft_memory is None and spec.recompute_norms is None and not fused_norms(resolve(spec))
        del old["draft_memory"], old["recompute_norms"]
        predating = measurement_from_mapping({"config": old, "steps": []}, "report.json").config
        assert predating.draft_memory is None and predating.recompute_norms is False
        resolve(predating)
    speculators = {**RunSpec(model="llama-3.1-8b", runtime="speculators", precision="fp32-autocast", offline=True,
                             sharding="none").to_dict(), "draft_memory": "plain", "recompute_norms": True}
    spec = plan_from_mapping({"fitplan_plan": 1, "config": speculators}, "plan.yaml").config
    assert spec.draft_memory is None and spec.recompute_norms is None and not lean_draft(resolve(spec).spec)
    # fitplan's eagle3 trainer: plain stays plain (the job it ran); lean with fused norms is auto's draft
    old = {**RunSpec(model="llama-3.1-8b").to_dict(), "draft_memory": "plain", "recompute_norms": True}
    spec = measurement_from_mapping({"config": old, "steps": []}, "report.json").config
    assert spec.draft_memory == "plain" and not lean_draft(spec) and not fused_norms(resolve(spec))
    del old["draft_memory"], old["recompute_norms"]
    predating = measurement_from_mapping({"config": old, "steps": []}, "report.json").config
    assert (predating.draft_memory, predating.recompute_norms) == ("plain", False)


def test_a_checkpoint_resumes_across_auto_and_an_explicit_switch():
    from trainer.checkpoint import config_changes

    assert config_changes({"sum_step_grads": True, "optimizer_per_param": None, "seq": 2048},
                          {"sum_step_grads": None, "optimizer_per_param": True, "seq": 2048}) == []
    # a checkpoint of the old defaults is auto's job; one of the plain draft is not
    assert config_changes({"draft_memory": "lean", "recompute_norms": True, "seq": 2048},
                          {"draft_memory": None, "recompute_norms": None, "seq": 2048}) == []
    assert config_changes({"draft_memory": "plain", "recompute_norms": True, "seq": 2048},
                          {"draft_memory": None, "recompute_norms": None, "seq": 2048}) == ["draft_memory"]


def test_fit_offloads_an_optimizer_stepped_a_parameter_at_a_time_without_a_refusal():
    # sft llama-3.1-8b at 2048 on one H100 fits only with its optimizer on the host; asked to step
    # a parameter at a time on the GPU, the offload rung puts the switch back to auto
    # (whole masters: split ones make no gradient copy to step a parameter at a time); so does it
    # with split_master asked for
    for asked in ({"optimizer_per_param": True, "split_master": False}, {"split_master": True}):
        result = fit(RunSpec(model="llama-3.1-8b", gpus="1xH100", workload="sft", seq=2048, **asked))
        assert result.chosen is not None and "offload optimizer" in result.changes, asked
        assert all(getattr(result.chosen.spec, switch) is None for switch in asked if asked[switch]), asked
        assert not any(reason.startswith(("optimizer_per_param", "split_master", "sum_step_grads", "recompute_mlp"))
                       for _, reason in result.refused), result.refused


def test_the_steps_gradients_are_summed_on_one_gpu_only():
    """Under FSDP each call's gradient is reduce-scattered and freed as its unit's backward ends;
    a sum held over the unroll would keep every unit's whole gradient through backward: auto
    stays off on several GPUs (and so does the head's gradients in forward, which go into those
    sums), true is refused there."""
    two = RunSpec(model="llama-3.1-8b", gpus="2xH200")
    assert not sums_step_grads(resolve(two)) and not head_grads_in_forward(resolve(two))
    assert not projects_embedding_once(resolve(two))
    one = resolve(two.replace(gpus="1xH200"))
    assert sums_step_grads(one) and head_grads_in_forward(one) and projects_embedding_once(one)
    for switch in ("sum_step_grads", "head_grad_in_forward", "project_embedding_once"):
        with pytest.raises(FitplanError, match=rf"^{switch}: .*, not with GPUs 2 \(accepted: "):
            resolve(two.replace(**{switch: True}))


def test_one_step_has_no_embedding_rows_to_share():
    """With one TTT step the projection would cover the step's own rows and only add its fp32
    gradient: auto leaves it off, true is refused naming ttt; from two steps on it runs."""
    one_step = RunSpec(model="llama-3.1-8b", gpus="1xH200", ttt=1)
    assert sums_step_grads(resolve(one_step)) and not projects_embedding_once(resolve(one_step))
    with pytest.raises(FitplanError, match=r"^project_embedding_once: .*, not with ttt 1 \(accepted: .*ttt 2 or more\)$"):
        resolve(one_step.replace(project_embedding_once=True))
    assert projects_embedding_once(resolve(one_step.replace(ttt=2, project_embedding_once=True)))


def test_a_report_predating_the_embedding_projection_ran_it_per_step():
    old = RunSpec(model="llama-3.1-8b").to_dict()
    del old["project_embedding_once"]
    spec = measurement_from_mapping({"config": old, "steps": []}, "report.json").config
    assert spec.project_embedding_once is False and not projects_embedding_once(resolve(spec))
