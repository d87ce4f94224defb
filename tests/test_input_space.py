"""The whole input space answers: every model profile x every GPU kind x 1, 2 and 8 GPUs x
eagle3 and sft x the three runtimes, through estimate, fit, check, diff and explain.

An answer is a result or a one-line refusal (FitplanError; on the command line exit 2 and one
`error:` line), never a traceback. The planner's entry points take the whole space (4,320
jobs; a speculators job both with DDP and with FSDP2); the command line takes a sample in which
every value of every axis appears, so the rendering of each model, GPU kind, count, workload and
runtime runs too; speculators jobs come in as speculators writes them (a train.py command line
or launch script). Bad values refuse the same way through every command.
"""

from __future__ import annotations

import itertools

import pytest
import yaml
from typer.testing import CliRunner

from fitplan.check import CheckRow, component_deltas, phase_deltas
from fitplan.cli import app
from fitplan.commands.fit import result_json
from fitplan.render.fit import summary_lines
from fitplan.config import RunSpec
from fitplan.errors import FitplanError
from fitplan.estimator import estimate
from fitplan.explain import config_lines, parse_ooms
from fitplan.ladder import fit
from fitplan.layout import resolve
from fitplan.profiles import gpu_names, model_names

COUNTS = (1, 2, 8)
WORKLOADS = ("eagle3", "sft")
RUNTIMES = ("fitplan", "specforge", "speculators")
# What speculators' train.py runs whatever it is told (fitplan.layout.SPECULATORS_KNOBS), and its
# two ways of spreading the draft: DDP (sharding none) and FSDP2 (--fsdp-shard, zero3).
SPECULATORS_KNOBS = {"precision": "fp32-autocast", "offline": True}
SPECULATORS_SHARDINGS = ("none", "zero3")
OOM_LOG = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of "
    "79.19 GiB of which 1.20 GiB is free. Including non-PyTorch memory, this process has 77.98 GiB memory in "
    "use. Of the allocated memory 74.10 GiB is allocated by PyTorch, and 2.37 GiB is reserved by PyTorch but "
    "unallocated."
)


def space():
    return itertools.product(model_names(), gpu_names(), COUNTS, WORKLOADS, RUNTIMES)


def specs_of(model: str, gpu: str, count: int, workload: str, runtime: str) -> list[RunSpec]:
    """The job with fitplan's defaults; a speculators job with what its train.py runs, DDP and FSDP2."""
    base = RunSpec(model=model, gpus=f"{count}x{gpu}", workload=workload, runtime=runtime)
    if runtime != "speculators":
        return [base]
    return [base.replace(**SPECULATORS_KNOBS, sharding=sharding) for sharding in SPECULATORS_SHARDINGS]


def plan_one(model: str, gpu: str, count: int, workload: str, runtime: str) -> str:
    """Everything the five commands compute for the job; 'refused' or 'answered' (every variant)."""
    outcomes = {plan_spec(spec) for spec in specs_of(model, gpu, count, workload, runtime)}
    return outcomes.pop() if len(outcomes) == 1 else "mixed"


def plan_spec(spec: RunSpec) -> str:
    try:
        job = resolve(spec)
    except FitplanError as exc:
        assert "\n" not in str(exc)
        return "refused"
    est = estimate(job)
    assert est.peak_reserved_bytes > 0 and est.verdict in ("fits", "at risk", "OOM")
    shorter = estimate(resolve(spec.replace(seq=spec.seq // 2)))
    CheckRow("job.yaml", est, shorter, 0.05).to_json()  # check --against
    component_deltas(shorter, est), phase_deltas(shorter, est)  # diff
    result = fit(spec)  # fit
    result_json(result)
    summary_lines(result)
    config_lines(parse_ooms(OOM_LOG)[0], result)  # explain with the job
    return "answered"


def test_every_job_of_the_space_answers_through_the_planner():
    outcomes = {}
    for job in space():
        try:
            outcomes[job] = plan_one(*job)
        except Exception as exc:  # noqa: BLE001 - the point: any other exception is a defect
            pytest.fail(f"{job}: {type(exc).__name__}: {exc}")
    answered = sum(o == "answered" for o in outcomes.values())
    assert len(outcomes) == 16 * 15 * 3 * 2 * 3
    # Refusals are the rules at work (sft has no specforge or speculators runtime, tp that splits
    # no model, ...), not most of the space.
    assert answered > len(outcomes) / 2
    # speculators' trainer holds no verifier: its eagle3 jobs answer for every model, GPU and count,
    # with DDP and with FSDP2
    assert all(o == "answered" for job, o in outcomes.items() if job[3:] == ("eagle3", "speculators"))


def cli_sample() -> list[tuple[str, str, int, str, str]]:
    """Every value of every axis at least once: each axis cycles through 48 rows, the runtime every
    third row, so that the 18 count x workload x runtime combinations all appear too (row i's
    count is i mod 3, its workload i mod 2, its runtime (i div 3) mod 3)."""
    axes = (model_names(), gpu_names(), COUNTS, WORKLOADS)
    rows = [(*(axis[i % len(axis)] for axis in axes), RUNTIMES[i // 3 % 3]) for i in range(48)]
    for k, axis in enumerate((*axes, RUNTIMES)):
        assert {row[k] for row in rows} == set(axis)
    assert len({row[2:] for row in rows}) == 3 * 2 * 3
    return rows


def speculators_launch(model: str, count: int, seq: int, fsdp: bool) -> str:
    """speculators' documented launch (docs/cli/train.md): torchrun's count, the verifier."""
    return (f"torchrun --standalone --nproc_per_node={count} scripts/train.py --verifier-name-or-path {model} "
            f"--data-path ./data --total-seq-len {seq}" + (" --fsdp-shard" if fsdp else ""))


def assert_answered(result, what: str) -> None:
    """exit 0 or 1 with output, or exit 2 with exactly one `error:` line; never a traceback."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{what}: {type(result.exception).__name__}: {result.exception}")
    assert result.exit_code in (0, 1, 2), what
    if result.exit_code == 2:
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{what}: {result.output}"
    else:
        assert result.output.strip(), what


@pytest.mark.parametrize("model,gpu,count,workload,runtime", cli_sample())
def test_every_command_answers_on_the_command_line(tmp_path, model, gpu, count, workload, runtime):
    runner = CliRunner()
    flags = ["--model", model, "--gpus", f"{count}x{gpu}", "--workload", workload, "--runtime", runtime]
    config = {"model": model, "gpus": f"{count}x{gpu}", "workload": workload, "runtime": runtime}
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text(yaml.safe_dump(config))
    new.write_text(yaml.safe_dump({**config, "seq": 8192}))
    if runtime == "speculators":  # as speculators launches it: the count from torchrun, the type from --gpus
        fsdp = model_names().index(model) % 2 == 1  # DDP and FSDP2 on every count
        flags = ["--from-speculators", speculators_launch(model, count, 4096, fsdp), "--gpus", f"1x{gpu}",
                 "--workload", workload]
        old, new = tmp_path / "old.sh", tmp_path / "new.sh"
        old.write_text(speculators_launch(model, count, 4096, fsdp) + "\n")
        new.write_text(speculators_launch(model, count, 8192, fsdp) + "\n")
    log = tmp_path / "oom.log"
    log.write_text(OOM_LOG)
    commands = {
        "estimate": ["estimate", *flags],
        "estimate --json": ["estimate", *flags, "--json"],
        "fit": ["fit", *flags],
        "check": ["check", str(old), str(new)],
        "diff": ["diff", str(old), str(new)],
        "explain": ["explain", str(log), *flags],
    }
    for what, args in commands.items():
        assert_answered(runner.invoke(app, args, env={"COLUMNS": "80"}), f"{what} {model} {count}x{gpu} {workload} {runtime}")


# ---------------------------------------------------------------- bad speculators inputs

LAUNCH = "torchrun --nproc_per_node 2 scripts/train.py --verifier-name-or-path Qwen/Qwen3-8B"
RUN_YAML = "train:\n  verifier:\n    verifier_name_or_path: Qwen/Qwen3-8B\n"
SPECULATORS_FLAGS = ["--runtime", "speculators", "--precision", "fp32-autocast", "--offline", "--sharding", "none"]
# A vLLM server left running on the trainer's GPUs, with a bad --gpu-memory-utilization.
COLOCATED = "vllm serve Qwen/Qwen3-8B --gpu-memory-utilization {u} &\n" + LAUNCH + "\n"

# (how the job is given, the text, flags, words the one line must hold). "launch": a train.py command
# line (--from-speculators) or the script holding it (a CONFIG); "command": --from-speculators only;
# "run.yaml": the file speculators writes beside its checkpoints; "flags": fitplan's keys (a YAML
# config, with flags).
BAD_SPECULATORS = [
    ("launch", LAUNCH + " --bogus 3 --lr-x", [], "unknown flags --bogus, --lr-x"),
    ("launch", LAUNCH + " --total-seq-len abc", [], "--total-seq-len must be an integer"),
    ("launch", LAUNCH + " --ttt-steps 0", [], "--ttt-steps must be a positive integer"),
    ("launch", LAUNCH + " --optimizer sgd", [], "'sgd' is not one of: adamw, muon"),
    ("launch", LAUNCH + " --fsdp-shard=yes", [], "--fsdp-shard takes no value"),
    ("launch", LAUNCH + " --speculator-type dflash", [], "EAGLE3 drafts only"),
    ("launch", LAUNCH + " --num-layers 2", [], "--num-layers 2: not modelled"),
    ("launch", LAUNCH + " --loss-implementation eager", [], "accepted: --loss-implementation fused"),
    ("launch", LAUNCH + " --embed-requires-grad", [], "accepted: --no-embed-requires-grad"),
    ("launch", LAUNCH + " --target-layer-ids 1 2", [], "3 verifier layers"),
    ("launch", LAUNCH.replace("Qwen/Qwen3-8B", "no-such/model-7b"), [], "resolves to no"),
    ("launch", LAUNCH + " stray", [], "unexpected argument 'stray'"),
    ("launch", LAUNCH + " --ttt-steps", [], "--ttt-steps needs a value"),
    ("launch", LAUNCH + " --no-norm", [], "--no-norm is ambiguous"),
    ("launch", LAUNCH + " --speculator-type medusa", [], "'medusa' is not one of"),
    # only with --from-speculators: a CONFIG without the verifier flag is not taken for a speculators launch
    ("command", "torchrun --nproc_per_node 2 scripts/train.py --data-path ./d", [], "--verifier-name-or-path is missing"),
    ("launch", LAUNCH, ["--draft", "qwen3-8b"], "speculators:N"),
    ("launch", LAUNCH, ["--runtime", "specforge"], "runtime"),
    ("launch", COLOCATED.format(u="1.5"), [], "--gpu-memory-utilization '1.5'"),
    ("launch", LAUNCH, ["--sglang-mem-fraction", "0.3"], "speculators' trainer runs no SGLang"),
    ("launch", LAUNCH, ["--vllm-gpu-memory-utilization", "1.5"], "vllm_gpu_memory_utilization must be in (0, 1)"),
    ("launch", LAUNCH, ["--vllm-gpu-memory-utilization", "0"], "vllm_gpu_memory_utilization must be in (0, 1)"),
    ("launch", LAUNCH, ["--tp", "2"], "runs no verifier to split (accepted: 1)"),
    ("launch", LAUNCH, ["--ac"], "accepted with --runtime speculators: false"),
    ("run.yaml", RUN_YAML + "  data:\n    total_seq_len: -5\n", [], "--total-seq-len must be a positive integer"),
    ("run.yaml", RUN_YAML + "  optimizer:\n    optimizer: sgd\n", [], "'sgd' is not one of: adamw, muon"),
    ("run.yaml", RUN_YAML + "  loss:\n    ttt_steps: true\n", [], "ttt_steps"),
    ("run.yaml", RUN_YAML + "  draft:\n    num_layers: 3\n", [], "not modelled"),
    ("flags", "model: qwen3-8b\nruntime: speculators\n", [], "accepted with --runtime speculators: fp32-autocast"),
    ("flags", "model: qwen3-8b\nruntime: speculators\nprecision: fp32-autocast\noffline: true\nsharding: zero2\n",
     [], "accepted with --runtime speculators: none, zero3"),
    ("flags", "model: qwen3-8b\nruntime: speculators\nprecision: fp32-autocast\noffline: true\nsharding: none\n"
     "optimizer: adamw-8bit\n", [], "muon, adamw"),
    ("flags", "model: qwen3-8b\nruntime: speculators\nprecision: fp32-autocast\noffline: true\nsharding: none\n"
     "vllm_gpu_memory_utilization: abc\n", [], "vllm_gpu_memory_utilization must be a number"),
    ("flags", "model: qwen3-8b\nvllm_gpu_memory_utilization: 0.3\n", [], "add --runtime speculators"),
    ("flags", "model: qwen3-8b\nruntime: specforge\nvllm_gpu_memory_utilization: 0.3\n", [], "runtime specforge runs none"),
    ("flags", "model: qwen3-8b\noptimizer: muon\n", [], "Muon is speculators' optimizer"),
    ("flags", "model: qwen3-8b\nruntime: specforge\noptimizer: muon\n", [], "runs optimizer adamw"),
]


def speculators_commands(tmp_path, kind: str, text: str, flags: list[str]) -> dict[str, list[str]]:
    """Every command, given the job each way it takes one: --from-speculators or a CONFIG."""
    log = tmp_path / "oom.log"
    log.write_text(OOM_LOG)
    path = tmp_path / {"launch": "train.sh", "command": "train.sh", "run.yaml": "run.yaml", "flags": "job.yaml"}[kind]
    path.write_text(text)
    given = [str(path), *flags]
    commands = {}
    if kind != "command":
        commands = {"estimate": ["estimate", *given], "estimate --json": ["estimate", *given, "--json"],
                    "fit": ["fit", *given], "explain": ["explain", str(log), "-c", *given]}
    if kind != "command" and not flags:  # check and diff take files only
        commands.update({"check": ["check", str(path)], "diff": ["diff", str(path), str(path)]})
    if kind != "flags":
        source = text if kind in ("launch", "command") and "\n" not in text else str(path)
        commands.update({f"{name} --from-speculators": [name, *pre, "--from-speculators", source, *flags]
                         for name, pre in (("estimate", []), ("fit", []), ("explain", [str(log)]))})
    return commands


@pytest.mark.parametrize("kind,text,flags,words", BAD_SPECULATORS)
def test_bad_speculators_inputs_refuse_alike_through_every_command(tmp_path, kind, text, flags, words):
    runner = CliRunner()
    for what, args in speculators_commands(tmp_path, kind, text, flags).items():
        result = runner.invoke(app, args, env={"COLUMNS": "80"})
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (what, result.output)
        assert words in lines[0], (what, lines[0])
        assert "Traceback" not in result.output, what
