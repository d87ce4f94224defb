"""The variables of a launch script, expanded the way the shell would for the lines fitplan reads.

SpecForge's own example scripts set `NUM_GPUS=${1:-8}`, `TP_SIZE=1` and then run
`torchrun --nproc_per_node $NUM_GPUS ... --tp-size $TP_SIZE`. Assignments (`NAME=value`,
`export NAME=value`) are read in order; `$NAME`, `${NAME}`, `${NAME:-default}` and
`${NAME-default}` are expanded from them (positional `${1:-8}` takes its default). Nothing is
read from the environment, so a script means the same on every machine: a variable the script
does not set, or sets from a command (`$(...)`), becomes an `Unset` marker, and only a value
fitplan actually needs is refused, naming the variable.
"""

from __future__ import annotations

import re

# A marker that survives shlex splitting: letters, digits and punctuation shlex keeps.
_MARK = "@@unset:{}@@"
_MARK_RE = re.compile(r"@@unset:([A-Za-z0-9_]+)@@")
_ASSIGN = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*|[0-9]+)(?:(:?-)([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*|[0-9])")
_COMMAND = re.compile(r"^\s*[\"']?(\$\(|`)")


def expand_script(text: str) -> str:
    """The script with continuation lines joined and every variable reference expanded."""
    values: dict[str, str] = {}
    lines = []
    for line in re.sub(r"\\\r?\n", " ", text).splitlines():
        if line.lstrip().startswith("#"):
            lines.append(line)
            continue
        assignment = _ASSIGN.match(line)
        if assignment and " " not in assignment.group(2).strip().strip("\"'"):
            name, raw = assignment.groups()
            values[name] = _MARK.format(name) if _COMMAND.match(raw) else _unquote(expand(raw, values))
        lines.append(expand(line, values))
    return "\n".join(lines)


def expand(text: str, values: dict[str, str]) -> str:
    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(4)
        value = values.get(name)
        if m.group(2) is not None:  # ${NAME:-default} / ${NAME-default}
            empty_counts = m.group(2) == ":-"
            if value is None or (empty_counts and value == ""):
                return expand(m.group(3), values)
        return value if value is not None else _MARK.format(name)

    return _REF.sub(one, text)


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def unset_variable(value: str) -> str | None:
    """The name of a variable the script does not set, if `value` holds one."""
    m = _MARK_RE.search(value)
    return m.group(1) if m else None


def strip_unset(value: str) -> str:
    """`value` without the variables the script does not set."""
    return _MARK_RE.sub("", value)
