"""What a compiled program asks of the device, read from its text: dot precisions and operations per loop step.

Why from the text: the precision policy and the per-step fixed cost must be checkable on a machine without an
accelerator. The lowered StableHLO is what every backend receives, so the precision of each dot there is the
precision on GPU/TPU too. The number of operations left in the decode loop's body after XLA's fusion passes
is a proxy for kernel launches per decode step (each fusion, dot or custom call is one kernel on a GPU); the
CPU compiler fuses differently from the GPU one, so compare counts within one backend only.
"""

from __future__ import annotations

import math
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


def _kernel_lines(comps: dict[str, list[str]], name: str, seen: set[str], pick=max) -> list[tuple[str, str, int]]:
    """(instruction line, opcode, times it runs) of every device operation (and while loop) one run of
    computation ``name`` launches, descending into the loops (times their trip count when XLA knows it, else once), branches (the
    one ``pick`` (max or min) chooses by size) and calls it contains; a fusion is one kernel."""
    out: list[tuple[str, str, int]] = []
    if name in seen or name not in comps:
        return out
    seen.add(name)
    for line in comps[name]:
        match = _HLO_INSTRUCTION.match(line)
        if not match:
            continue
        opcode = match.group(1)
        if opcode not in _FREE or opcode == "while":  # loops are listed (not kernels): their iterations count
            out.append((line, opcode, 1))
        if opcode in ("while", "conditional", "call"):
            callees = [c.strip() for group in _CALLED.findall(line) for c in group.replace("%", "").split(",")]
            counted = [_kernel_lines(comps, callee, set(seen), pick) for callee in callees]
            if opcode == "conditional" and counted:  # one branch runs: count the one `pick` chooses
                counted = [pick(counted, key=lambda c: sum(times for _, _, times in c))]
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line) if opcode == "while" else None
            for c in counted:  # a loop of known length (a layer scan) runs its body n times
                out.extend((ln, op, times * (int(trips.group(1)) if trips else 1)) for ln, op, times in c)
    return out


def _loop_body(comps: dict[str, list[str]], entry: str | None) -> str | None:
    """The body of the entry computation's outermost while loop (the decode step), if any."""
    for line in comps.get(entry, []):
        match = _HLO_INSTRUCTION.match(line)
        if match and match.group(1) == "while":
            body = re.search(r"\bbody=%?([\w.\-]+)", line)
            return body.group(1) if body else None
    return None


def loop_body_ops(text: str, branches: str = "largest") -> Counter:
    """Device operations per iteration of the entry computation's outermost while loop (the decode step):
    opcode -> count. Empty when the program has no loop. ``branches``: "largest" counts the costlier side of
    every conditional (e.g. sampling, log-probabilities), "smallest" the cheaper one (greedy, none asked)."""
    comps, entry = _computations(text)
    return _ops_of(comps, _loop_body(comps, entry), branches)


def program_ops(text: str, branches: str = "smallest") -> Counter:
    """Device operations one run of a compiled program launches (a prefill: every layer, unrolled), opcode ->
    count, loops counted once per iteration; ``branches`` as in ``loop_body_ops``."""
    comps, entry = _computations(text)
    return _ops_of(comps, entry, branches)


def _ops_of(comps: dict[str, list[str]], name: str | None, branches: str) -> Counter:
    """Opcode -> count of the device operations one run of computation ``name`` launches (none for None)."""
    pick = {"largest": max, "smallest": min}[branches]
    ops: Counter = Counter()
    for _, opcode, times in (_kernel_lines(comps, name, set(), pick) if name else []):
        if opcode != "while":
            ops[opcode] += times
    return ops


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
                "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
# Operations (or fusions whose result is made by one) that only move data: a copy of their output is written.
# (A dynamic-update-slice is not one: it updates its operand in place.)
_MOVES = frozenset({"copy", "gather", "dynamic-slice", "slice", "concatenate", "transpose", "pad", "reverse",
                    "broadcast"})


def _result_shapes(line: str, opcode: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of every array in an instruction's result type."""
    result = line.split("=", 1)[1].split(f" {opcode}(", 1)[0]
    return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _ARRAY_SHAPE.findall(result)]


def _nbytes(shapes) -> int:
    return sum(_DTYPE_BYTES.get(dtype, 4) * math.prod(dims) for dtype, dims in shapes)


def _squeezed(shape: tuple[str, tuple[int, ...]]) -> tuple[str, tuple[int, ...]]:
    """A shape without its leading 1s (a layer's [1, D, F] slice of a stacked array has a weight's shape)."""
    dtype, dims = shape
    while dims and dims[0] == 1:
        dims = dims[1:]
    return dtype, dims


def _moving_op(comps: dict[str, list[str]], line: str, opcode: str) -> str | None:
    """The data-moving opcode an instruction amounts to (itself, or a loop fusion's root seen through
    bitcasts and reshapes), else None."""
    if opcode in _MOVES:
        return opcode
    called = re.search(r"\bcalls=%?([\w.\-]+)", line) if opcode == "fusion" and "kind=kLoop" in line else None
    if not called:
        return None
    defs = {}  # name -> (opcode, first operand name)
    root = None
    for inner in comps.get(called.group(1), []):
        found = re.match(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\(%?([\w.\-]*)", inner)
        if found:
            defs[found.group(2)] = (found.group(3), found.group(4))
            root = found.group(2) if found.group(1) else root
    while root in defs and defs[root][0] in ("bitcast", "reshape"):
        root = defs[root][1]
    op = defs.get(root, (None,))[0]
    return op if op in _MOVES else None


def decode_step_profile(text: str, branches: str = "smallest") -> dict:
    """The per-step fixed cost of a compiled decode program (``Engine.compiled_text("decode", shape)``), as
    what one iteration of its outermost while loop launches:

    * ``kernels``: device operations (fusions, dots, custom calls, standalone copies/gathers/scatters), and
      ``by_opcode``;
    * ``inner_loop_iterations``: iterations of loops nested in the step (e.g. a bisection in the sampler): on a
      GPU each one also evaluates its condition on the host unless the loop runs from a command buffer;
    * ``moved_bytes``: bytes written per step by kernels that only move data (copies, gathers, slices,
      concatenations, as themselves or as a fusion's root); of those, ``weight_copy_bytes`` are copies with
      the shape of a weight (a matrix parameter of 16 KiB or more that the program does not update, leading 1s
      aside: e.g. a layer's weights read out of a stacked array by a scanned layer body) and
      ``state_copy_bytes`` copies with the shape of the state the program updates in place (the donated KV
      cache and token counts: XLA copies it when a read could follow an in-place update).
    ``branches`` as in ``loop_body_ops``.
    """
    pick = {"largest": max, "smallest": min}[branches]
    comps, entry = _computations(text)
    body = _loop_body(comps, entry)
    lines = _kernel_lines(comps, body, set(), pick) if body else []
    header = text.split("\n", 1)[0]
    aliases = header.split("input_output_alias=", 1)[1].split("entry_computation_layout", 1)[0] \
        if "input_output_alias=" in header else ""
    donated = {int(n) for n in re.findall(r"\((\d+),", aliases)}
    weight_shapes, state_shapes = set(), set()
    for line in comps.get(entry, []):
        match = _HLO_INSTRUCTION.match(line)
        number = re.search(r"\bparameter\((\d+)\)", line)
        if match and match.group(1) == "parameter" and number:
            shapes = [_squeezed(s) for s in _result_shapes(line, "parameter")]
            if int(number.group(1)) in donated:
                state_shapes.update(shapes)
            else:
                weight_shapes.update(s for s in shapes if len(s[1]) >= 2 and _nbytes([s]) >= 16 << 10)
    ops: Counter = Counter()
    moved = weights = state = iterations = 0
    for line, opcode, times in lines:
        if opcode == "while":
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            iterations += times * (int(trips.group(1)) if trips else 1)
            continue
        ops[opcode] += times
        if _moving_op(comps, line, opcode):
            shapes = _result_shapes(line, opcode)
            moved += times * _nbytes(shapes)
            weights += times * _nbytes([s for s in shapes if _squeezed(s) in weight_shapes])
            state += times * _nbytes([s for s in shapes if _squeezed(s) in state_shapes])
    return {"kernels": sum(ops.values()), "by_opcode": dict(ops.most_common()),
            "inner_loop_iterations": iterations, "moved_bytes": moved, "weight_copy_bytes": weights,
            "state_copy_bytes": state}
