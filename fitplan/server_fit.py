"""`fitplan fit` for a SpecForge v0.3 run's managed capture servers: the cheapest change, in the
run config's own keys, that makes each server fit its GPUs.

A server is checked with the estimate of docs/estimate.md, "Capture servers" (SGLang's documented
sizing, not calibrated), and must leave fit's margin of its GPU free, as the trainers must. One
that does not is changed in cost order:
1. `model.sglang_max_total_tokens`, when it caps the KV pool below one request, is raised to one
   request: it costs no memory, since SGLang reserves mem_fraction_static x the GPU whatever the cap;
2. `mem_fraction_static`, at the given tp_size: the hundredth nearest the given value at which it
   fits. Lower when the static share leaves too little for the prefill and the runtime (a smaller
   KV pool, as long as it still holds one request of context_length tokens: SGLang cannot
   schedule a longer one); higher when the share does not hold the weights or one request;
3. `tp_size`, raised to the next size SGLang splits the target into (fitplan.layout's rules for the
   specforge runtime: it divides the attention heads and the node's GPUs, KV heads are split or
   replicated; and model.sglang_ep_size must divide it), at the given mem_fraction_static or the
   nearest that fits there. SpecForge requires one cuda_visible_devices entry per tp rank, so the
   GPUs it adds are taken, lowest first, from the node's GPUs that no trainer or server lists;
   the node's GPU count is --node-gpus, else 8 (an HGX board) or more if the config lists more;
otherwise nothing fits, and the answer says why, per server.

Over the whole node, the GPU count is the only limit: more GPUs per server only ever come from
free ones, never from the trainers or another server.

The answer is in keys `specforge train -c run.yaml KEY=VALUE` takes. Its override parser
(specforge/config/schema.py, apply_overrides) walks mappings only and cannot index a list entry
(neither can fitplan's, which follows it), so changed servers are written by replacing
`capture_servers` whole, every entry with its other keys as given; a mem_fraction_static that
every server inheriting `model.sglang_mem_fraction_static` moves to alike is written there
instead. `edits` name each change by its entry (`...capture_servers[0].tp_size=2`) for people.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from fitplan.config import RunSpec, show
from fitplan.errors import FitplanError
from fitplan.estimator.capture_server import (
    ServerEstimate,
    ServerGroup,
    estimate_group,
    estimate_servers,
)
from fitplan.layout import tp_options
from fitplan.profiles import GpuSpec
from fitplan.shapes import ModelShape
from fitplan.specforge_yaml import (
    ManagedServer,
    SpecForgeRun,
    apply_overrides,
    read_config,
)
from fitplan.specforge_yaml import (
    _get as typed_key,  # the schema's typed reader, SpecForge's defaults
)
from fitplan.units import GIB

MANAGED = "deployment.disaggregated.managed_local"
SERVERS_KEY = f"{MANAGED}.capture_servers"
# GPUs of the node when --node-gpus is not given: the 8 of an HGX H100 / H200 / B200 board, where
# SpecForge's managed_local examples run trainers and servers side by side.
NODE_GPUS = 8
NODE_GPUS_FLAG = "--node-gpus"


def check_node_gpus(count: int | None) -> None:
    """--node-gpus' own value, before anything is read."""
    from fitplan.profiles import MAX_GPUS_PER_NODE

    if count is not None and not 1 <= count <= MAX_GPUS_PER_NODE:
        raise FitplanError(f"{NODE_GPUS_FLAG} {count} is out of range; accepted: 1 to {MAX_GPUS_PER_NODE}")


def group_fits(group: ServerGroup, margin: float) -> bool:
    """Fits with `margin` of the GPU free: fit's rule for the trainers, kept for the servers,
    whose estimate is not calibrated."""
    return group.fits and group.peak_reserved_bytes <= (1 - margin) * group.gpu_total_bytes


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def _why(group: ServerGroup, margin: float) -> str:
    """Why a server does not fit, in one clause (the estimate's own reason says more)."""
    if not group.starts:
        return (f"the weights ({_gib(group.weights_bytes)} per GPU) fill the static share "
                f"({group.mem_fraction} x {_gib(group.gpu_total_bytes)}): SGLang does not start")
    if not group.holds_request:
        return (f"the KV pool holds {group.kv_pool_tokens} tokens, less than one request "
                f"({group.context_length})")
    if not group.fits:
        return f"peak {_gib(group.peak_reserved_bytes)} exceeds the GPU's {_gib(group.gpu_total_bytes)}"
    return f"peak {_gib(group.peak_reserved_bytes)} leaves less than the {margin:.0%} margin of the GPU free"


@dataclass(frozen=True)
class Target:
    """What every server of the run runs: the target on the trainers' GPU type."""

    model: ModelShape
    spec: RunSpec
    gpu: GpuSpec
    margin: float

    def estimate(self, server: ManagedServer) -> ServerGroup:
        return estimate_group(self.model, self.spec, server, self.gpu)

    def nearest_fraction(self, server: ManagedServer) -> ServerGroup | None:
        """The server at its mem_fraction_static if it fits there, else at the hundredth nearest
        it that does; None when none does. Everything the fit needs grows with the fraction (the
        static share, the pool, the peak), so the fractions that fit are one interval: the scan
        down finds its top when the given value is above it, the scan up its bottom otherwise."""
        group = self.estimate(server)
        if group_fits(group, self.margin):
            return group
        hundredths = round(server.mem_fraction * 100, 6)
        for k in (*range(math.ceil(hundredths) - 1, 0, -1), *range(math.floor(hundredths) + 1, 101)):
            group = self.estimate(replace(server, mem_fraction=k / 100))
            if group_fits(group, self.margin):
                return group
        return None


@dataclass(frozen=True)
class Entry:
    """One capture_servers[index] as written, and the server it runs (count 1)."""

    index: int
    raw: dict
    server: ManagedServer
    inherits: bool  # no mem_fraction_static of its own: model.sglang_mem_fraction_static's
    devices: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"capture_servers[{self.index}]"


@dataclass
class Node:
    """The managed_local node: its GPU count, where it came from, and the GPU indices no trainer
    or server lists (None when the config names GPUs by UUID or MIG slice, not by index)."""

    gpus: int
    given: bool
    free: list[int] | None

    def __str__(self) -> str:
        said = f"by {NODE_GPUS_FLAG}" if self.given else f"assumed, {NODE_GPUS_FLAG} N gives the count"
        return f"{self.gpus}-GPU node, {said}"


@dataclass(frozen=True)
class Choice:
    tp: int
    fraction: float
    added: tuple[str, ...]  # cuda_visible_devices the server gains


@dataclass(frozen=True)
class ServerFix:
    """fit's answer for the capture servers: their estimate after the changes (as given when there
    are none or nothing fits), the changes as overrides and per entry, and per server why nothing
    fits."""

    fixed: ServerEstimate
    overrides: tuple[str, ...]
    edits: tuple[str, ...]
    notes: tuple[str, ...]  # one line per changed server: why, and what changed
    problems: tuple[str, ...]
    target: Target = field(repr=False)

    @property
    def fits(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "server": self.fixed.to_json(),
            "server_fits": self.fits,
            "server_changes": list(self.overrides),
            "server_edits": list(self.edits),
            "server_problems": list(self.problems),
        }

    def check_written(self, written: SpecForgeRun, path: Any) -> None:
        """`fit -o`: the servers of the run config as read back must fit, or nothing is written."""
        est = estimate_servers(self.target.model, self.target.spec, written.servers, self.target.gpu)
        bad = [g for g in (est.groups if est else ()) if not group_fits(g, self.target.margin)]
        if bad or est is None:
            why = _why(bad[0], self.target.margin) if bad else "it has no managed capture servers"
            raise FitplanError(f"fit -o {path}: the written run config's capture servers do not fit ({why}); "
                               "nothing written")


# ---------------------------------------------------------------- reading the entries


def _managed(run: SpecForgeRun) -> dict:
    node: Any = run.mapping
    for key in MANAGED.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def _entries(run: SpecForgeRun) -> list[Entry]:
    """Every server entry, with its fraction resolved as SpecForge does (its own, else the model's).
    read_config has typed tp_size and mem_fraction_static; SpecForge also requires one
    cuda_visible_devices entry per tp rank, which the search relies on to add GPUs."""
    base = run.servers[0]  # context length and token cap: the run's, the same for every server
    default = typed_key(run.mapping, "model.sglang_mem_fraction_static", run.source)
    out = []
    for i, raw in enumerate(_managed(run).get("capture_servers") or []):
        if not isinstance(raw, dict):
            continue
        tp = int(raw.get("tp_size", 1))
        own = raw.get("mem_fraction_static")
        devices = raw.get("cuda_visible_devices")
        if not isinstance(devices, list) or len(devices) != tp:
            listed = f"lists {len(devices)}" if isinstance(devices, list) else f"is {show(devices, 40)}"
            raise FitplanError(
                f"{run.source}: {SERVERS_KEY}[{i}].cuda_visible_devices {listed} for tp_size {tp}: SpecForge "
                f"requires one device per tp rank (accepted: a list of {tp} device{'s' if tp != 1 else ''})")
        server = replace(base, tp=tp, mem_fraction=default if own is None else float(own), count=1)
        out.append(Entry(i, raw, server, own is None, tuple(str(d) for d in devices)))
    return out


def _node(run: SpecForgeRun, entries: list[Entry], node_gpus: int | None) -> Node:
    trainers = _managed(run).get("trainer_cuda_visible_devices") or []
    used = [str(d) for d in trainers] + [d for e in entries for d in e.devices]
    if not all(d.isascii() and d.isdigit() for d in used):
        return Node(node_gpus or NODE_GPUS, node_gpus is not None, None)
    taken = {int(d) for d in used}
    highest = max(taken, default=-1)
    if node_gpus is not None and node_gpus <= highest:
        raise FitplanError(f"{NODE_GPUS_FLAG} {node_gpus}: {run.source} lists GPU {highest} on the managed_local node "
                           f"(accepted: at least {highest + 1})")
    count = node_gpus if node_gpus is not None else max(NODE_GPUS, highest + 1)
    return Node(count, node_gpus is not None, [g for g in range(count) if g not in taken])


# ---------------------------------------------------------------- the search


def _choose(entry: Entry, target: Target, node: Node, ep: int) -> tuple[Choice | None, str]:
    """The cheapest (tp, fraction) at which the server fits, or None and why none does."""
    server = entry.server
    group = target.nearest_fraction(server)
    if group is not None:
        return Choice(server.tp, group.mem_fraction, ()), ""
    tried = [_why(target.estimate(server), target.margin),
             f"no mem_fraction_static in 0.01-1.00 fits at tp_size {server.tp}"]
    larger = [t for t in tp_options(target.model, node.gpus, "specforge") if t > server.tp and t % ep == 0]
    if not larger:
        tried.append(f"no larger tp_size splits {target.model.name} ({target.model.heads} attention heads) "
                     f"on the {node}")
    for tp in larger:
        need = tp - server.tp
        group = target.nearest_fraction(replace(server, tp=tp))
        if group is None:
            tried.append(f"nor at tp_size {tp}")
            continue
        if node.free is None:
            tried.append(f"tp_size {tp} would fit with {need} more GPU{'s' if need != 1 else ''}, which fitplan cannot "
                         "name: the config's cuda_visible_devices are not GPU indices (add them yourself)")
        elif need > len(node.free):
            tried.append(f"tp_size {tp} would fit but needs {need} more GPU{'s' if need != 1 else ''}; "
                         f"{len(node.free)} {'is' if len(node.free) == 1 else 'are'} listed by no trainer or server "
                         f"on the {node}")
        else:
            added = tuple(str(g) for g in node.free[:need])
            del node.free[:need]
            return Choice(tp, group.mem_fraction, added), ""
        break  # a larger size needs more GPUs still
    return None, "; ".join(tried)


def _flow(value: Any) -> str:
    """A YAML flow value on one line, as SpecForge's overrides read a structured value."""
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 30).strip()


def _answer(run: SpecForgeRun, entries: list[Entry], choices: list[Choice], node: Node,
            target: Target) -> tuple[list[str], list[str], list[str]]:
    """(overrides, edits, notes) that give every entry its choice."""
    overrides, edits, notes = [], [], []
    default = typed_key(run.mapping, "model.sglang_mem_fraction_static", run.source)
    inherited = {c.fraction for e, c in zip(entries, choices) if e.inherits}
    model_level = len(inherited) == 1 and inherited != {default}
    if model_level:
        key = f"model.sglang_mem_fraction_static={inherited.pop()}"
        overrides.append(key)
        edits.append(key)
    listed = copy.deepcopy(_managed(run).get("capture_servers") or [])
    for e, c in zip(entries, choices):
        raw, done = listed[e.index], []
        if c.tp != e.server.tp:
            raw["tp_size"] = c.tp
            raw["cuda_visible_devices"] = list(raw["cuda_visible_devices"]) + list(c.added)
            done.append(f"tp_size {e.server.tp} -> {c.tp} with GPU{'s' if len(c.added) != 1 else ''} "
                        f"{', '.join(c.added)} added to cuda_visible_devices (listed by no trainer or server "
                        f"on the {node})")
            edits += [f"{SERVERS_KEY}[{e.index}].tp_size={c.tp}",
                      f"{SERVERS_KEY}[{e.index}].cuda_visible_devices={_flow(raw['cuda_visible_devices'])}"]
        if c.fraction != e.server.mem_fraction:
            done.append(f"mem_fraction_static {e.server.mem_fraction} -> {c.fraction}")
            if not (e.inherits and model_level):
                raw["mem_fraction_static"] = c.fraction
                edits.append(f"{SERVERS_KEY}[{e.index}].mem_fraction_static={c.fraction}")
        if done:
            why = _why(target.estimate(e.server), target.margin)
            notes.append(f"{e.name} (tp_size {e.server.tp}, mem_fraction_static {e.server.mem_fraction}: {why}): "
                         f"{'; '.join(done)}")
    if any(e.raw != listed[e.index] for e in entries):
        overrides.append(f"{SERVERS_KEY}={_flow(listed)}")
    return overrides, edits, notes


def fit_servers(run: SpecForgeRun | None, model: ModelShape, spec: RunSpec, gpu: GpuSpec, margin: float,
                node_gpus: int | None = None) -> ServerFix | None:
    """The capture servers' fix of a SpecForge v0.3 run (None: it has no managed servers)."""
    if run is None or not run.servers:
        if node_gpus is not None:
            raise FitplanError(f"{NODE_GPUS_FLAG} counts the GPUs of a SpecForge v0.3 run's managed_local node "
                               "(deployment.disaggregated.managed_local); this job has no managed capture servers")
        return None
    target = Target(model, spec, gpu, margin)
    entries = _entries(run)
    node = _node(run, entries, node_gpus)
    given = estimate_servers(model, spec, run.servers, gpu)
    overrides, notes = [], []
    base = run.servers[0]
    if base.max_total_tokens is not None and base.max_total_tokens < base.context_length:
        overrides.append(f"model.sglang_max_total_tokens={base.context_length}")
        notes.append(f"model.sglang_max_total_tokens {base.max_total_tokens} -> {base.context_length} "
                     "(one request of context_length; the cap frees no memory)")
        entries = [replace(e, server=replace(e.server, max_total_tokens=base.context_length)) for e in entries]
    ep = max(1, typed_key(run.mapping, "model.sglang_ep_size", run.source))
    choices, problems = [], []
    for e in entries:
        choice, problem = _choose(e, target, node, ep)
        choices.append(choice)
        if choice is None:
            problems.append(f"{e.name} (tp_size {e.server.tp}, mem_fraction_static {e.server.mem_fraction}): {problem}")
    if problems:
        return ServerFix(given, (), (), (), tuple(problems), target)
    edits = list(overrides)  # the cap: a key of its own
    more, more_edits, more_notes = _answer(run, entries, choices, node, target)
    overrides, edits, notes = overrides + more, edits + more_edits, notes + more_notes
    if not overrides:
        return ServerFix(given, (), (), (), (), target)
    fixed = estimate_servers(model, spec, _read_back(run, overrides).servers, gpu)
    return ServerFix(fixed, tuple(overrides), tuple(edits), tuple(notes), (), target)


def _read_back(run: SpecForgeRun, overrides: list[str]) -> SpecForgeRun:
    """The run with the overrides applied, read as SpecForge reads it (its schema walk included)."""
    mapping = copy.deepcopy(run.mapping)
    apply_overrides(mapping, overrides, run.source)
    return read_config(mapping, run.source)
