"""Loop-aware work of a compiled program, read from its optimised HLO text (per device).

XLA's `compiled.cost_analysis()` counts the body of every while loop once. A training step runs
its decoder layers under `lax.scan` (one loop forward, one backward), its microbatches under
`lax.scan` and the sampler's decode under a `while_loop`, so those totals miss most of the work.
`analyze(hlo_text, unknown_trip_count)` walks the module instead and multiplies each loop body
by its trip count:

  - XLA's `known_trip_count` annotation where the compiler wrote one (CPU, GPU), else, on TPU,
    read from the loop: a condition `i < n` with n constant, i's start in the tuple the loop
    begins from and the step its body adds (TPU's windowed-einsum loops over a sharded matmul
    start at 2 or step by 2; scans count 0, 1, ...);
  - `unknown_trip_count` for a loop whose bound is not a constant (the sampler's decode loop
    stops at a traced limit or when every row has produced EOS: pass the worst case, the number
    of decode steps).

Counted per device (the HLO of an SPMD program is one device's program):
  flops: 2 x output elements x contracted size for each dot and convolution, plus one per
    output element of elementwise arithmetic and one per input element of a reduction
    (XLA's own convention; transcendentals are not flops).
  bytes: HBM bytes read and written by each top-level operation (a fusion reads its operands
    and writes its output once): dynamic slices read only the slice, an in-place
    dynamic-update-slice writes only the update (as XLA's cost analysis); a collective reads
    its input and writes its result once per run, however many fusions TPU spreads it over;
    arrays TPU keeps in on-chip memory (layout "S(1)") and no-copy custom calls do not count.
  collectives: for each kind (all-gather, all-reduce, reduce-scatter, all-to-all,
    ragged-all-to-all, collective-permute): the operations in the text, how many run
    (loop-scaled) and the bytes they move (the larger of input and output, per run; for a
    ragged all-to-all, the mixture of experts' token exchange, its input: the most it can send,
    since the sizes it sends are only known at run time).

A conditional counts its most expensive branch. The result is an estimate for a roofline, not
a profile: it ignores caches, overlap and scheduling. Checked (tests/trainer/test_plan.py): the
flops of the train step, prefill and decode loop against the jaxpr's matmul flops (within 25%
on CPU and on a v5e compile), loop bodies against XLA's own count.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Dict, List, Mapping, NamedTuple, Optional, Tuple

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "token": 0}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9](?:fn|fnuz|b11fnuz)?)?)\[([0-9,]*)\]")
_ARRAY_LAYOUT = re.compile(
    r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9](?:fn|fnuz|b11fnuz)?)?)\[([0-9,]*)\](\{[^}]*\})?")
# custom calls that move no data (TPU: a concatenation by aliasing, a buffer allocation)
_NO_TRAFFIC_CALLS = ("ConcatBitcast", "AllocateBuffer", "AssumeGatherIndicesInBound")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_NAME = re.compile(r"%([\w.\-]+)")
_ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "compare",
                "select", "negate", "abs", "and", "or", "xor", "not", "clamp", "remainder",
                "sign", "floor", "ceil", "round-nearest-even", "round-nearest-afz",
                "shift-left", "shift-right-logical", "shift-right-arithmetic", "convert"}
_ASYNC_COLLECTIVE = re.compile(r'custom_call_target="AsyncCollective(Start|Done)"')
_NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "call",
               "conditional", "after-all", "partition-id", "replica-id", "opt-barrier",
               "add-dependency", "domain"}


class Instr(NamedTuple):
    """One HLO instruction: its name, result type text, opcode, operand names, attribute text."""

    name: str
    type: str
    opcode: str
    operands: Tuple[str, ...]
    attrs: str


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective kind: ops in the text; runs and bytes moved per device, loop-scaled."""

    ops: int = 0
    runs: float = 0.0
    bytes: float = 0.0


@dataclasses.dataclass(frozen=True)
class Work:
    """Per-device work of a program: flops, HBM bytes, collectives by kind, and the loops
    (trip counts, outermost first; None where `unknown_trip_count` was used)."""

    flops: float
    bytes: float
    collectives: Mapping[str, Collective]
    loops: Tuple[Optional[int], ...]


def array_shapes(type_text: str) -> List[Tuple[str, Tuple[int, ...]]]:
    """[(dtype, dims)] of every array in a (possibly tuple) HLO type, e.g. "(f32[2,3], s32[])"."""
    return [(dt, tuple(int(d) for d in dims.split(",") if d))
            for dt, dims in _ARRAY.findall(type_text) if dt in _DTYPE_BYTES or "f8" in dt]


def type_bytes(type_text: str) -> float:
    """Bytes of an HLO type (the sum over a tuple's arrays)."""
    return sum(_DTYPE_BYTES.get(dt, 1) * math.prod(dims) for dt, dims in array_shapes(type_text))


def hbm_bytes(type_text: str) -> float:
    """Bytes of an HLO type held in device memory: arrays whose layout puts them in another
    memory space (TPU's on-chip VMEM, "S(1)") are left out."""
    total = 0.0
    for dt, dims, layout in _ARRAY_LAYOUT.findall(type_text):
        if (dt in _DTYPE_BYTES or "f8" in dt) and "S(1)" not in layout:
            total += _DTYPE_BYTES.get(dt, 1) * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _collective_part(instr: "Instr") -> bool:
    """A collective, or TPU's start / done of an async one (their data is counted once, as the
    collective's, not as the fusions' that carry it)."""
    return (instr.opcode.removesuffix("-start") in COLLECTIVES
            or (instr.opcode == "custom-call" and bool(_ASYNC_COLLECTIVE.search(instr.attrs))))


def _tuple_elements(type_text: str) -> List[str]:
    """The top-level elements of a tuple type "(a, (b, c), d)" -> ["a", "(b, c)", "d"]."""
    text = type_text.strip()
    if not text.startswith("("):
        return [text]
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(text):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
            if depth == 0:
                parts.append(text[start:i].strip())
        elif ch == "," and depth == 1:
            parts.append(text[start:i].strip())
            start = i + 1
    return [p for p in parts if p]


def _elements(type_text: str) -> int:
    return sum(math.prod(dims) for _, dims in array_shapes(type_text))


def _split_type(rest: str) -> Tuple[str, str]:
    """'(a, b) op(...)...' or 'f32[2]{0} op(...)' -> (type text, the remainder)."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].lstrip()
    i = rest.find(" ")
    return rest[:i], rest[i + 1:].lstrip()


def _parse_instr(line: str) -> Optional[Tuple[bool, Instr]]:
    m = _INSTR.match(line)
    if not m:
        return None
    root, name, rest = bool(m.group(1)), m.group(2), m.group(3)
    type_text, rest = _split_type(rest)
    m2 = re.match(r"([\w\-]+)\(", rest)
    if not m2:
        return None
    opcode = m2.group(1)
    depth, start = 0, m2.end() - 1
    end = len(rest)
    for i in range(start, len(rest)):
        depth += rest[i] == "("
        depth -= rest[i] == ")"
        if depth == 0:
            end = i
            break
    inside = rest[start + 1:end]
    attrs = rest[end + 1:]
    if opcode == "parameter":  # keep its number: parameter(3)
        attrs = f"parameter_number={inside.strip()} {attrs}"
    return root, Instr(name, type_text, opcode, tuple(_NAME.findall(inside)), attrs)


@dataclasses.dataclass
class Module:
    """Computations of an HLO module: name -> instructions, their roots, and the entry."""

    computations: Dict[str, List[Instr]]
    roots: Dict[str, Instr]
    entry: str

    @classmethod
    def parse(cls, text: str) -> "Module":
        comps, roots, entry, current = {}, {}, None, None
        for line in text.splitlines():
            if current is None:
                m = _HEADER.match(line)
                if m:
                    current = m.group(2)
                    comps[current] = []
                    if m.group(1):
                        entry = current
                continue
            if line.lstrip().startswith("}"):  # also `}, execution_thread="..."`, `} // name`
                current = None
                continue
            parsed = _parse_instr(line)
            if parsed is not None:
                root, instr = parsed
                comps[current].append(instr)
                if root:
                    roots[current] = instr
        if entry is None:
            raise ValueError("no ENTRY computation in the HLO text")
        return cls(comps, roots, entry)


def _attr(attrs: str, key: str) -> Optional[str]:
    m = re.search(key + r"=(\{[^}]*\}|%?[\w.\-]+)", attrs)
    return None if m is None else m.group(1)


def _called(attrs: str, key: str) -> List[str]:
    v = _attr(attrs, key)
    return [] if v is None else _NAME.findall(v) or [v.strip("{}%")]


def _dims(attrs: str, key: str) -> Tuple[int, ...]:
    v = _attr(attrs, key)
    return () if v is None else tuple(int(x) for x in re.findall(r"\d+", v))


def _window(attrs: str, rank: int) -> List[Dict[str, Tuple[int, ...]]]:
    """Per spatial dimension: size, stride, pad (low, high), lhs and rhs dilation."""
    m = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(kv.split("=", 1) for kv in (m.group(1).split() if m else []))

    def per_dim(key, default):
        if key not in fields:
            return [default] * rank
        return [tuple(int(v) for v in part.split("_")) for part in fields[key].split("x")]

    size, stride = per_dim("size", (1,)), per_dim("stride", (1,))
    pad = per_dim("pad", (0, 0))
    lhs_d, rhs_d = per_dim("lhs_dilate", (1,)), per_dim("rhs_dilate", (1,))
    return [dict(size=size[d][0], stride=stride[d][0], pad=pad[d], lhs_dilate=lhs_d[d][0],
                 rhs_dilate=rhs_d[d][0]) for d in range(rank)]


def _convolution_flops(instr: Instr, shapes: Mapping[str, str]) -> float:
    """2 x batch x output features x input features x the (output, window) position pairs of
    each spatial dimension that fall on a real (undilated, unpadded) input element."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instr.attrs)
    lhs = array_shapes(shapes.get(instr.operands[0], "")) if instr.operands else []
    rhs = array_shapes(shapes.get(instr.operands[1], "")) if len(instr.operands) > 1 else []
    out = array_shapes(instr.type)
    if not (labels and lhs and rhs and out):
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    lhs_d, rhs_d, out_d = lhs[0][1], rhs[0][1], out[0][1]
    spatial = [c for c in out_l if c.isdigit()]
    windows = _window(instr.attrs, len(spatial))
    pairs = 1
    for c, w in zip(spatial, windows):
        n_out, n_in = out_d[out_l.index(c)], lhs_d[lhs_l.index(c)]
        last = (n_in - 1) * w["lhs_dilate"]
        count = 0
        for o in range(n_out):
            for k in range(w["size"]):
                p = o * w["stride"] + k * w["rhs_dilate"] - w["pad"][0]
                count += 0 <= p <= last and p % w["lhs_dilate"] == 0
        pairs *= count
    batch_features = out_d[out_l.index("b")] * out_d[out_l.index("f")]
    return 2.0 * batch_features * rhs_d[rhs_l.index("i")] * pairs


class _Walker:
    def __init__(self, module: Module, unknown_trip_count: int, constants):
        self.m = module
        self.constants = constants
        self.scale_loops = True
        self.unknown = unknown_trip_count
        self.loops: List[Optional[int]] = []
        self.collectives: Dict[str, List[float]] = {k: [0, 0.0, 0.0] for k in COLLECTIVES}
        self._seen_ops = set()

    def shapes(self, comp: str) -> Dict[str, str]:
        return {i.name: i.type for i in self.m.computations[comp]}

    def trip_count(self, instr: Instr, caller: str) -> Optional[int]:
        """A while loop's trip count: XLA's annotation (CPU, GPU), else read from the loop
        (TPU): a condition `i < n` with n a constant (the compare may be fused), i's initial
        value a constant in the tuple the loop starts from (else 0) and its step the constant
        the body adds to it (else 1): ceil((n - start) / step). None when n is not constant."""
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.attrs)
        if m:
            return int(m.group(1))
        cond = _called(instr.attrs, "condition")
        root = self.m.roots.get(cond[0]) if cond else None
        if root is None or len(root.operands) != 2:
            return None
        counter, bound, where = root.operands[0], root.operands[1], cond[0]
        if root.opcode == "fusion":  # the compare fused: its operands are the fusion's
            fused = _called(root.attrs, "calls")
            inner = self.m.roots.get(fused[0]) if fused else None
            if inner is None or inner.opcode != "compare" or len(inner.operands) != 2:
                return None
            operands = []
            for name in inner.operands:
                index = self._parameter_index(fused[0], name)
                operands.append((cond[0], root.operands[index]) if index is not None
                                and index < len(root.operands) else (fused[0], name))
            (_, counter), (where, bound) = operands
            root = inner
        if root.opcode != "compare" or "direction=LT" not in root.attrs:
            return None
        n = self.constants.get((where, bound))
        if n is None:
            return None
        index = self._tuple_index(cond[0], counter)
        start = step = None
        if index is not None:
            start = self._initial(instr, caller, index)
            step = self._step(_called(instr.attrs, "body"), index)
        start, step = start or 0, step or 1
        return max(-(-(n - start) // step), 0) if step > 0 else None

    def _find(self, comp: str, name: str) -> Optional[Instr]:
        return next((i for i in self.m.computations.get(comp, []) if i.name == name), None)

    def _tuple_index(self, comp: str, name: str) -> Optional[int]:
        """k of `get-tuple-element(parameter), index=k` (through copies and conversions)."""
        i = self._find(comp, name)
        while i is not None and i.opcode in ("copy", "convert", "bitcast") and i.operands:
            i = self._find(comp, i.operands[0])
        if i is None or i.opcode != "get-tuple-element":
            return None
        m = re.search(r"index=(\d+)", i.attrs)
        return int(m.group(1)) if m else None

    def _constant_through(self, comp: str, name: str) -> Optional[int]:
        i = self._find(comp, name)
        while i is not None and i.opcode in ("copy", "convert", "bitcast") and i.operands:
            i = self._find(comp, i.operands[0])
        return None if i is None else self.constants.get((comp, i.name))

    def _initial(self, instr: Instr, caller: str, index: int) -> Optional[int]:
        init = self._find(caller, instr.operands[0]) if instr.operands else None
        if init is None or init.opcode != "tuple" or index >= len(init.operands):
            return None
        return self._constant_through(caller, init.operands[index])

    def _step(self, bodies: List[str], index: int) -> Optional[int]:
        if not bodies:
            return None
        root = self.m.roots.get(bodies[0])
        if root is None or root.opcode != "tuple" or index >= len(root.operands):
            return None
        update = self._find(bodies[0], root.operands[index])
        if update is None or update.opcode != "add" or len(update.operands) != 2:
            return None
        a, b = update.operands
        if self._tuple_index(bodies[0], a) == index:
            return self._constant_through(bodies[0], b)
        if self._tuple_index(bodies[0], b) == index:
            return self._constant_through(bodies[0], a)
        return None

    def _parameter_index(self, comp: str, name: str) -> Optional[int]:
        for i in self.m.computations[comp]:
            if i.name == name and i.opcode == "parameter":
                m = re.match(r"parameter_number=(\d+)", i.attrs)
                return int(m.group(1)) if m else None
        return None

    def op_flops(self, instr: Instr, shapes: Mapping[str, str]) -> float:
        op = instr.opcode
        if op == "dot":
            lhs = array_shapes(shapes.get(instr.operands[0], ""))
            if not lhs:
                return 0.0
            dims = lhs[0][1]
            k = math.prod(dims[d] for d in _dims(instr.attrs, "lhs_contracting_dims"))
            return 2.0 * _elements(instr.type) * k
        if op == "convolution":
            return _convolution_flops(instr, shapes)
        if op in _ELEMENTWISE:
            return float(_elements(instr.type))
        if op in ("reduce", "reduce-window"):
            return float(sum(_elements(shapes.get(o, "")) for o in instr.operands[:1]))
        return 0.0

    def count_collective(self, instr: Instr, shapes: Mapping[str, str], mult: float,
                         seen: set) -> float:
        """Counts a collective once per run of the computation that holds it (TPU splits an
        async collective over several fusions that each show it with the same channel_id);
        returns the HBM bytes of one run: its input read and its result written."""
        op = instr.opcode.removesuffix("-start")
        if op not in COLLECTIVES:
            return 0.0
        m = re.search(r"channel_id=(\d+)", instr.attrs)
        key = (op, m.group(1)) if m else (op, instr.name)
        if key in seen:
            return 0.0
        seen.add(key)
        if op == "ragged-all-to-all":  # operands: input, output buffer (the result), sizes
            read = shapes.get(instr.operands[0], "") if instr.operands else ""
            moved = type_bytes(read)
            hbm = hbm_bytes(read) + hbm_bytes(instr.type)
        else:
            moved = max(type_bytes(instr.type),
                        sum(type_bytes(shapes.get(o, "")) for o in instr.operands))
            hbm = hbm_bytes(instr.type) + sum(hbm_bytes(shapes.get(o, "")) for o in instr.operands)
        c = self.collectives[op]
        if key not in self._seen_ops:
            self._seen_ops.add(key)
            c[0] += 1
        c[1] += mult
        c[2] += mult * moved
        return hbm

    def fused_flops(self, comp: str, mult: float, seen: set) -> Tuple[float, float]:
        """(flops, HBM bytes of its collectives) of a fused computation (nested fusions
        included); counts its collectives."""
        shapes = self.shapes(comp)
        flops = moved = 0.0
        for instr in self.m.computations[comp]:
            moved += self.count_collective(instr, shapes, mult, seen)
            if instr.opcode == "fusion":
                for c in _called(instr.attrs, "calls"):
                    f, b = self.fused_flops(c, mult, seen)
                    flops, moved = flops + f, moved + b
            else:
                flops += self.op_flops(instr, shapes)
        return flops, moved

    def fusion_bytes(self, instr: Instr, shapes: Mapping[str, str]) -> float:
        calls = _called(instr.attrs, "calls")
        if not calls:
            return hbm_bytes(instr.type) + sum(hbm_bytes(shapes.get(o, ""))
                                                for o in instr.operands)
        body = self.m.computations[calls[0]]
        params = {i.name: i for i in body if i.opcode == "parameter"}
        users: Dict[str, List[Instr]] = {}
        for i in body:
            for o in i.operands:
                users.setdefault(o, []).append(i)
        read = 0.0
        for name, p in params.items():
            us = users.get(name, [])
            if all(u.opcode == "tuple" or _collective_part(u) for u in us):
                continue  # passed through, or a collective's buffer (counted as a collective)
            if all(u.opcode == "dynamic-slice" and u.operands[0] == name for u in us):
                read += sum(hbm_bytes(u.type) for u in us)
            elif us and all(u.opcode == "dynamic-update-slice" and u.operands[0] == name
                            for u in us):
                continue  # updated in place: only the update is written (below)
            else:
                read += hbm_bytes(p.type)
        root = self.m.roots.get(calls[0])
        body_shapes = {i.name: i.type for i in body}
        outs = [root] if root is not None and root.opcode != "tuple" else [
            next((i for i in body if i.name == o), None) for o in (root.operands if root else ())]
        written = 0.0
        for o in outs:
            if o is None or o.opcode == "parameter" or _collective_part(o):
                continue  # passed through, or a collective's result (counted as a collective)
            if o.opcode == "dynamic-update-slice":
                written += hbm_bytes(body_shapes.get(o.operands[1], ""))
            else:
                written += hbm_bytes(o.type)
        return read + written

    def op_bytes(self, instr: Instr, shapes: Mapping[str, str]) -> float:
        op = instr.opcode
        if op in _NO_TRAFFIC or op.endswith("-done"):
            return 0.0
        if op == "custom-call" and any(f'"{t}"' in instr.attrs for t in _NO_TRAFFIC_CALLS):
            return 0.0
        if op == "fusion":
            return self.fusion_bytes(instr, shapes)
        if op == "dynamic-slice":
            return 2.0 * hbm_bytes(instr.type)
        if op == "dynamic-update-slice":
            return 2.0 * hbm_bytes(shapes.get(instr.operands[1], ""))
        if op.endswith("-start"):  # async copy / slice: ((operands), result, context)
            parts = _tuple_elements(instr.type)
            result = parts[1] if len(parts) > 1 else instr.type
            source = sum(hbm_bytes(shapes.get(o, "")) for o in instr.operands)
            return min(source, type_bytes(result)) + hbm_bytes(result)
        return hbm_bytes(instr.type) + sum(hbm_bytes(shapes.get(o, "")) for o in instr.operands)

    def walk(self, comp: str, mult: float, depth: int = 0) -> Tuple[float, float]:
        """(flops, bytes) of running computation `comp` `mult` times."""
        shapes = self.shapes(comp)
        flops = bytes_ = 0.0
        seen: set = set()  # collectives counted in this run of `comp`
        for instr in self.m.computations[comp]:
            op = instr.opcode
            if op == "while":
                n = self.trip_count(instr, comp)
                self.loops.append(n)
                trips = (self.unknown if n is None else n) if self.scale_loops else 1
                for body in _called(instr.attrs, "body"):
                    f, b = self.walk(body, mult * trips, depth + 1)
                    flops, bytes_ = flops + f, bytes_ + b
                continue
            if op == "call" or (op.startswith("async-start") or op == "async-start"):
                for c in _called(instr.attrs, "to_apply") + _called(instr.attrs, "calls"):
                    f, b = self.walk(c, mult, depth + 1)
                    flops, bytes_ = flops + f, bytes_ + b
                continue
            if op == "conditional":
                branches = (_called(instr.attrs, "branch_computations")
                            + _called(instr.attrs, "true_computation")
                            + _called(instr.attrs, "false_computation"))
                costs = [self.walk(c, mult, depth + 1) for c in branches]
                if costs:
                    f, b = max(costs)
                    flops, bytes_ = flops + f, bytes_ + b
                continue
            if op == "fusion":
                for c in _called(instr.attrs, "calls"):
                    f, b = self.fused_flops(c, mult, seen)
                    flops, bytes_ = flops + mult * f, bytes_ + mult * b
                bytes_ += mult * self.op_bytes(instr, shapes)
            elif _collective_part(instr):
                bytes_ += mult * self.count_collective(instr, shapes, mult, seen)
            else:
                flops += mult * self.op_flops(instr, shapes)
                bytes_ += mult * self.op_bytes(instr, shapes)
        return flops, bytes_


def analyze(hlo_text: str, unknown_trip_count: int = 1, scale_loops: bool = True) -> Work:
    """The loop-scaled `Work` of one device's compiled HLO module (`compiled.as_text()`).
    scale_loops=False counts every loop body once, as XLA's cost analysis (for comparison)."""
    module = Module.parse(hlo_text)
    walker = _Walker(module, unknown_trip_count, _constants_from_text(hlo_text))
    walker.scale_loops = scale_loops
    flops, bytes_ = walker.walk(module.entry, 1.0)
    return Work(flops=flops, bytes=bytes_,
                collectives={k: Collective(int(v[0]), v[1], v[2])
                             for k, v in walker.collectives.items()},
                loops=tuple(walker.loops))


# What an instruction's attributes name as computations it runs
_CALLEES = ("body", "condition", "to_apply", "branch_computations", "calls")


def loop_instructions(hlo_text: str) -> List[Instr]:
    """The instructions that run inside a while loop of a compiled module (loop bodies and
    conditions, and what they call, fuse or branch to), each computation once: e.g. the copies
    a decode step makes (`tests/rollout/test_refill.py`, `experiments/refill_copies.py`)."""
    module = Module.parse(hlo_text)
    todo = [c for instrs in module.computations.values() for instr in instrs
            if instr.opcode == "while" for key in ("body", "condition")
            for c in _called(instr.attrs, key)]
    inside: List[str] = []
    while todo:
        c = todo.pop()
        if c not in inside and c in module.computations:
            inside.append(c)
            todo += [callee for instr in module.computations[c] for key in _CALLEES
                     for callee in _called(instr.attrs, key)]
    return [instr for c in inside for instr in module.computations[c]]


def _constants_from_text(text: str) -> Dict[Tuple[str, str], int]:
    """(computation, name) -> value of every integer scalar constant ("s32[] constant(8)")."""
    out, current = {}, None
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            current = m.group(2)
            continue
        c = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*[su](?:32|64)\[\]\S*\s+"
                     r"constant\((-?\d+)\)", line)
        if c and current is not None:
            out[(current, c.group(1))] = int(c.group(2))
    return out
