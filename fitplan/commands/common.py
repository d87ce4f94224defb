"""What every fitplan command shares: the RunSpec flags and clean bad-input handling.

`spec_flags` adds one typer option per RunSpec field to a command, so `estimate`, `fit`,
`check` and `train` accept the same flags with the same help. The command receives the
flags given (None for those not given) as a dict in its `flags` parameter, and builds the
spec with `fitplan.config.load_spec(config_path, flags)`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer

from fitplan.config import CHOICES, FIELD_NAMES, RunSpec
from fitplan.errors import FitplanError

HELP: dict[str, str] = {
    "model": "Target model: profile name (see `fitplan profiles`), HF repo id, config.json or model directory.",
    "draft": ("Eagle3 draft: 'auto' (derived from the target), a draft profile name, or a config path; runtime "
              "speculators: auto, speculators (its draft, full vocabulary) or speculators:N (pruned to N tokens)."),
    "gpus": "GPUs: COUNTxTYPE, e.g. 8xH100, 1xH200, 4xA100-80GB; NODESxCOUNTxTYPE for several nodes (2x8xH100).",
    "workload": "eagle3: frozen target + trainable Eagle3 draft. sft: full fine-tune of the model.",
    "seq": "Maximum sequence length (tokens per sample; the padded length of the longest batch).",
    "micro_batch": "Samples per GPU per forward/backward.",
    "global_batch": "Samples per optimizer step over all GPUs (sets accumulation).",
    "accum": "Gradient-accumulation micro-steps per optimizer step (or give --global-batch).",
    "tp": "Tensor-parallel size of the frozen target (eagle3). Default: smallest that fits.",
    "sharding": "Sharding of the trained model: zero1 (optimizer), zero2 (+grads), zero3 (+params).",
    "output_sharding": "How target outputs reach the ranks: gather (every rank holds the TP group's full logits) or all-to-all (its own rows only).",
    "precision": "mixed (fp32 master + bf16 copy, 18 B/param), fp32-autocast, bf16-master (bf16 params, fp32 master + moments in the optimizer), bf16 (pure bf16).",
    "optimizer": "adamw, adamw-8bit (8-bit moments), or muon (runtime speculators: Muon for the matrices).",
    "ac": "Activation checkpointing (draft layer per TTT step; every decoder block for sft).",
    "attention": "Attention kernel: split (fitplan's eagle3 trainer on Hopper from seq 4096: step 0's keys on a "
                 "causal kernel, later steps' folded in; the default there), flex (other eagle3 default), sdpa "
                 "(sft default) or eager (materialized scores).",
    "ttt": "Training-time-test unroll length of the Eagle3 draft.",
    "target_weights": "Frozen target weights: bf16, or mxfp4 (packed, gpt-oss only).",
    "offload": "CPU offload: none, optimizer (state), params (with zero3).",
    "expandable_segments": "Run with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (less fragmentation).",
    "aux_layers": "Target layers whose hidden states feed the draft, e.g. '1,17,33'.",
    "runtime": ("fitplan (our trainer), specforge (SpecForge's classic train_eagle3.py) or speculators (vLLM "
                "speculators' scripts/train.py; modelled, not measured on a GPU)."),
    "target_backend": "specforge runtime: sglang or hf target backend.",
    "sglang_mem_fraction": "specforge runtime: SGLang's mem_fraction_static (its share of each trainer GPU).",
    "vllm_gpu_memory_utilization": ("speculators runtime: the gpu_memory_utilization of a vLLM server sharing "
                                    "the trainer's GPUs."),
    "offline": ("Target features from disk, no live target: SpecForge's offline mode, or fitplan's "
                "trainer (eagle3, tp 1) with fitplan train --hidden-states DIR."),
    "draft_memory": ("fitplan runtime, eagle3. lean: the draft's lm_head is fused with the loss, SwiGLU "
                     "recomputed in backward (no step keeps its logits). plain: torch's composition, as "
                     "SpecForge's draft. Default: lean where it applies; given elsewhere, refused."),
    "recompute_norms": ("fitplan runtime, eagle3 lean draft: RMSNorm outputs and o_proj's input made again in "
                        "backward rather than kept, the teacher held as bf16 logits (false: as the first lean "
                        "draft). Default: on where it applies; turned on elsewhere, refused."),
    "sum_step_grads": ("fitplan runtime, eagle3 lean draft with fused norms (not with mixed): each draft weight's "
                       "gradient summed over the TTT steps in one buffer, handed to autograd once (false: one per "
                       "step). Default: on where it applies; turned on elsewhere, refused."),
    "recompute_mlp": ("fitplan runtime, lean draft with fused norms: the MLP's gate and up made again in backward "
                      "rather than kept (4I bytes per token per TTT step less, ~5% more step time)."),
    "head_grad_in_forward": ("fitplan runtime, lean draft with summed step gradients: the fused head makes its "
                             "gradients in forward, its logits formed once (some 5-10% of a step less; 2h bytes "
                             "per token per TTT step kept, the teacher let go before backward). Default: on where "
                             "it applies; turned on elsewhere, refused."),
    "project_embedding_once": ("fitplan runtime, lean draft with summed step gradients, 2 or more TTT steps: the "
                               "embedding's half of q/k/v projected once per unroll, not per step (no step keeps its "
                               "embedding; false: per step). Default: on where it applies; turned on elsewhere, "
                               "refused."),
    "optimizer_per_param": ("fitplan runtime, bf16-master, optimizer on the GPU: the optimizer steps a parameter at "
                            "a time, one fp32 gradient copy alive instead of all. Default: on for eagle3, off for sft "
                            "(one optimizer call per tensor; fit turns it on when memory is short); turned on "
                            "elsewhere, refused."),
    "split_master": ("fitplan runtime, bf16-master, AdamW on the GPU: each fp32 master held as its bf16 parameter "
                     "and 16 low bits, stepped from the bf16 gradient by one kernel per tensor (2 B/param of master "
                     "instead of 4, no fp32 gradient copy; false: whole fp32 masters). Default: on where it applies; "
                     "turned on elsewhere, refused."),
    "share_embedding": ("fitplan runtime, eagle3, live target at tp 1: the draft's frozen embedding is the target's "
                        "own tensor (false: a copy, one more [V, h] held)."),
}

DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(RunSpec) if f.default is not dataclasses.MISSING
}

# Switches whose default (None) is decided per job; their help says how.
AUTO_BOOLS = ("optimizer_per_param", "sum_step_grads", "head_grad_in_forward", "recompute_norms",
              "project_embedding_once", "split_master")

_TYPES: dict[str, Any] = {
    "seq": int, "micro_batch": int, "global_batch": int, "accum": int, "tp": int, "ttt": int,
    "sglang_mem_fraction": float, "vllm_gpu_memory_utilization": float,
    "ac": bool, "expandable_segments": bool, "offline": bool, "recompute_norms": bool, "share_embedding": bool, "sum_step_grads": bool,
    "recompute_mlp": bool, "optimizer_per_param": bool, "head_grad_in_forward": bool, "project_embedding_once": bool,
    "split_master": bool,
}


def _option(name: str) -> inspect.Parameter:
    flag = "--" + name.replace("_", "-")
    kind = _TYPES.get(name, str)
    help_text = HELP.get(name, "")
    if name in CHOICES:
        help_text += f" Choices: {', '.join(CHOICES[name])}."
    default = DEFAULTS.get(name)
    if default is not None and kind is not bool:
        help_text += f" Default: {default}."
    elif kind is bool and name not in AUTO_BOOLS:
        help_text += f" Default: {'on' if default else 'off'}."
    decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
    if name == "model":
        decls.append("-m")
    option = typer.Option(None, *decls, help=help_text, rich_help_panel="Job")
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[kind])


def spec_flags(func: Callable) -> Callable:
    """Give a command every RunSpec flag; it receives them as `flags: dict` (given ones only)."""
    sig = inspect.signature(func)
    own = [p for p in sig.parameters.values() if p.name != "flags"]

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        flags = {k: kwargs.pop(k) for k in FIELD_NAMES if k in kwargs}
        return func(flags={k: v for k, v in flags.items() if v is not None}, **kwargs)

    params = own + [_option(name) for name in FIELD_NAMES if name not in sig.parameters]
    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return wrapper


FROM_SPECFORGE_HELP = (
    "A SpecForge train_eagle3.py launch command (or a file holding the script), or a SpecForge v0.3 "
    "run config followed by its section.field=value overrides in one quoted value "
    "(\"run.yaml training.batch_size=2\"), to read the job from."
)
FROM_SPECULATORS_HELP = (
    "A vLLM speculators scripts/train.py command line, or a file holding the launch script or the run.yaml it "
    "writes beside its checkpoints, to read the job from (estimated with runtime speculators)."
)
MARGIN_HELP = "Safety margin of device memory: a fraction (0.05) or a percentage (5)."


def margin_fraction(value: float) -> float:
    """--margin as a fraction: 0.05 and 5 both mean 5%."""
    if 0 <= value < 1:
        return value
    if 1 <= value < 100:
        return value / 100
    raise FitplanError(f"--margin {value} is out of range; accepted: a fraction in [0, 1) or a percentage in [1, 100)")


@dataclasses.dataclass(frozen=True)
class JobInput:
    spec: RunSpec
    warnings: list[str]
    # how the user wrote the job: fitplan's keys, a SpecForge launch script, a SpecForge v0.3 run
    # config; answers (fit's changes) are given in the same terms
    dialect: str = "fitplan"
    # a SpecForge v0.3 run's managed capture servers (fitplan.specforge_yaml.ManagedServer), one
    # per kind; () for every other job
    servers: tuple = ()
    # a SpecForge v0.3 online run: its capture servers stream the target's features to the
    # trainers (the trainer job alone looks offline)
    streams_features: bool = False
    # the SpecForge v0.3 run config itself (fitplan.specforge_yaml.SpecForgeRun): what `fit -o`
    # rewrites; None for every other job
    run: Any = None

    def __iter__(self) -> Iterator[Any]:
        """Unpacks as (spec, warnings, dialect), as the commands do; `servers` is read by name."""
        return iter((self.spec, self.warnings, self.dialect))


def job_spec(config: Optional[Path], flags: dict, from_specforge: Optional[str],
             from_speculators: Optional[str] = None) -> JobInput:
    """The job from a config file (YAML, plan, launch script or SpecForge v0.3 run config), flags,
    or --from-specforge (a launch command line, or a v0.3 run config and its overrides: "run.yaml
    training.batch_size=2"); flags override each. Also what reading it ignored or assumed.
    A speculators job (--from-speculators, or such a CONFIG) runs under runtime speculators
    (fitplan/speculators.py)."""
    from fitplan.config import spec_from_text

    given = [name for name, value in (("a CONFIG file", config), ("--from-specforge", from_specforge),
                                      ("--from-speculators", from_speculators)) if value is not None]
    if len(given) > 1:
        raise FitplanError(f"give one of a CONFIG file, --from-specforge or --from-speculators, not {' and '.join(given)}")
    if from_speculators is not None:
        from fitplan.speculators import read as read_speculators

        speculators = read_speculators(from_speculators, flags)
        return JobInput(speculators.spec(flags), list(speculators.warnings))
    if from_specforge is not None:
        from fitplan.specforge import parse_command
        from fitplan.specforge_yaml import from_specforge_value

        run = from_specforge_value(from_specforge, flags)
        if run is not None:
            return JobInput(run.spec, list(run.warnings), "specforge-yaml", run.servers, run.online, run)
        command = parse_command(from_specforge)
        return JobInput(command.spec(flags), list(command.warnings), "specforge-script")
    if config is None:  # flags alone: none of the job-file readers is imported
        return JobInput(spec_from_text(None, "flags", flags), [])
    return _job_file(config, flags)


def _job_file(config: Path, flags: dict) -> JobInput:
    """A CONFIG file's job: a speculators script or run.yaml, a SpecForge v0.3 run config, a
    SpecForge launch script, or fitplan's own YAML / plan."""
    from fitplan.config import is_launch_script, read_job_file, spec_from_text
    from fitplan.specforge import parse_command
    from fitplan.specforge_yaml import read_text
    from fitplan.speculators import from_config_text

    text = read_job_file(config)
    speculators = from_config_text(text, str(config), flags)
    if speculators is not None:
        return JobInput(speculators.spec(flags), list(speculators.warnings))
    run = read_text(text, str(config), flags)
    if run is not None:
        return JobInput(run.spec, list(run.warnings), "specforge-yaml", run.servers, run.online, run)
    if not is_launch_script(text):
        return JobInput(spec_from_text(text, str(config), flags), [])
    command = parse_command(str(config))
    return JobInput(command.spec(flags), list(command.warnings), "specforge-script")


def clean_errors(func: Callable) -> Callable:
    """Bad input -> one red line on stderr and exit code 2, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except FitplanError as exc:
            fail(str(exc))

    return wrapper


def fail(message: str, code: int = 2) -> None:
    """`error: MESSAGE` on stderr, one line, the message verbatim (not rich markup: text such as
    'fitplan[plot]' keeps its brackets), then exit `code`."""
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True, highlight=False).print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)
    sys.exit(code)
