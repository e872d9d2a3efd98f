"""What a compiled program asks of the device, read from its text: dot precisions and operations per loop step.

Why from the text: the precision policy and the per-step fixed cost must be checkable on a machine without an
accelerator. The lowered StableHLO is what every backend receives, so the precision of each dot there is the
precision on GPU/TPU too. The number of operations left in the decode loop's body after XLA's fusion passes
is a proxy for kernel launches per decode step (each fusion, dot or custom call is one kernel on a GPU); the
CPU compiler fuses differently from the GPU one, so compare counts within one backend only.
"""

from __future__ import annotations

import re
from collections import Counter

# StableHLO: `stablehlo.dot_general ... precision = [HIGHEST, HIGHEST]` (no attribute: DEFAULT).
_STABLEHLO_OP = re.compile(r"stablehlo\.(dot_general|convolution)\b(.*)")
_STABLEHLO_PRECISION = re.compile(r"precision(?:_config)? = \[([^\]]*)\]")
# Compiled HLO: `%name = shape opcode(operands), attributes`.
_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*.*?\s([a-z][\w\-]*)\((.*)$")
_HLO_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_CALLED = re.compile(r"\b(?:body|calls|to_apply|branch_computations|true_computation|false_computation)="
                     r"\{?([%\w.\-, ]+)\}?")

# Instructions that move no data on the device (tuple plumbing, aliases of their operand, loop control).
_FREE = frozenset({"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while", "conditional",
                   "call", "after-all", "partition-id", "replica-id", "opt-barrier"})


def stablehlo_dot_precisions(text: str) -> list[str]:
    """The operand precision of every dot_general and convolution in a lowered module (``Lowered.as_text()``),
    e.g. ["HIGHEST", "HIGHEST", "DEFAULT"]; an operation without the attribute counts as "DEFAULT"."""
    out = []
    for _, rest in _STABLEHLO_OP.findall(text):
        found = _STABLEHLO_PRECISION.search(rest)
        names = {p.strip().split()[-1].rstrip(">") for p in found.group(1).split(",")} if found else {"DEFAULT"}
        out.append("/".join(sorted(names)))
    return out


def hlo_dot_precisions(text: str) -> list[str]:
    """The ``operand_precision`` of every dot and convolution in compiled HLO (``Compiled.as_text()``)."""
    out = []
    for line in text.splitlines():
        match = _HLO_INSTRUCTION.match(line)
        if match and match.group(1) in ("dot", "convolution"):
            found = re.search(r"operand_precision=\{([^}]*)\}", line)
            out.append("/".join(sorted(set(found.group(1).split(",")))) if found else "default")
    return out


def _computations(text: str) -> tuple[dict[str, list[str]], str | None]:
    """Instruction lines of every computation in compiled HLO text, and the entry computation's name."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in text.splitlines():
        header = _HLO_COMPUTATION.match(line)
        if header:
            current = header.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None:
            comps[current].append(line)
    return comps, entry


def _kernel_ops(comps: dict[str, list[str]], name: str, seen: set[str], pick=max) -> Counter:
    """Opcode counts of the device operations one run of computation ``name`` launches, descending into the
    loops (times their trip count when XLA knows it, else once), branches (the one ``pick`` (max or min)
    chooses by size) and calls it contains; a fusion is one kernel."""
    ops: Counter = Counter()
    if name in seen or name not in comps:
        return ops
    seen.add(name)
    for line in comps[name]:
        match = _HLO_INSTRUCTION.match(line)
        if not match:
            continue
        opcode = match.group(1)
        if opcode not in _FREE:
            ops[opcode] += 1
        if opcode in ("while", "conditional", "call"):
            callees = [c.strip() for group in _CALLED.findall(line) for c in group.replace("%", "").split(",")]
            counted = [_kernel_ops(comps, callee, set(seen), pick) for callee in callees]
            if opcode == "conditional" and counted:  # one branch runs: count the one `pick` chooses
                counted = [pick(counted, key=lambda c: sum(c.values()))]
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line) if opcode == "while" else None
            for c in counted:
                for opcode_name, count in c.items():  # a loop of known length (a layer scan) runs its body n times
                    ops[opcode_name] += count * (int(trips.group(1)) if trips else 1)
    return ops


def loop_body_ops(text: str, branches: str = "largest") -> Counter:
    """Device operations per iteration of the entry computation's outermost while loop (the decode step):
    opcode -> count. Empty when the program has no loop. ``branches``: "largest" counts the costlier side of
    every conditional (e.g. sampling, log-probabilities), "smallest" the cheaper one (greedy, none asked)."""
    pick = {"largest": max, "smallest": min}[branches]
    comps, entry = _computations(text)
    for line in comps.get(entry, []):
        match = _HLO_INSTRUCTION.match(line)
        if match and match.group(1) == "while":
            body = re.search(r"\bbody=%?([\w.\-]+)", line)
            return _kernel_ops(comps, body.group(1), set(), pick) if body else Counter()
    return Counter()
