"""Run a graph stage by stage, each stage fed from tensors cached by earlier ones.

The staged CWAC fit needs, for stage k, tensors at the stage-k compensation
points computed by a model in which stages < k are already compensated.
Re-running the whole prefix of the model per stage costs O(stages) passes.
Instead, stage k runs only its *segment*: the nodes needed to compute its
outputs, walking back from them and stopping at tensors an earlier stage
already computed (or at the graph inputs)::

    inputs ─► [segment 1] ─► p1 ─┐                     (p_k: stage-k points,
          └───────────────────── ┼─► [segment 2] ─► p2   cached per batch)
                                 └────────────────────► [segment 3] ─► p3

Everything downstream of a cached point (e.g. the compensation Mul/Add of the
previous stage, a Relu, a residual Add) is recomputed in the segment that
needs it, from the cached point, so each segment sees exactly what the full
model would compute there: the fit is the same as with whole-prefix runs.

The segment structure depends only on the graph, so it is planned once
(:class:`SegmentPlan`); initializer values (fitted gains and biases) may
change between stages and are read when a segment is extracted.
:class:`TensorCache` keeps the cached tensors in memory up to a byte budget
(``CwacConfig.cache_mib``, 64 MiB by default) and on disk beyond it, one file per batch and tensor, and
drops each one after the last segment that reads it, so memory is bounded by
the budget plus one batch whatever the size of the calibration set.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ..model_io import private_tempdir


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names read inside a node's subgraph attributes (If/Loop/Scan bodies): what the bodies
    read minus what they define themselves (their inputs, initializers and node outputs)."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            local |= {o for n in g.node for o in n.output}
            for n in g.node:
                names.update(i for i in n.input if i and i not in local)
                names |= _subgraph_inputs(n) - local
    return names


def node_inputs(node: onnx.NodeProto) -> set[str]:
    """Every tensor a node reads: its inputs and what its subgraphs read from the enclosing graph."""
    return {i for i in node.input if i} | _subgraph_inputs(node)


@dataclasses.dataclass(frozen=True)
class Segment:
    nodes: tuple[int, ...]  # indices into the model's node list, in topological order
    inputs: tuple[str, ...]  # tensors fed from the cache or the graph inputs
    outputs: tuple[str, ...]


class SegmentPlan:
    """The segment of each stage of ``model`` (its node list must be topologically sorted).

    A segment stops at the graph inputs, at earlier stages' points, and at any other tensor an earlier
    segment computed from the inputs: that segment returns it as an extra output (``Segment.outputs``
    after the stage's own points) and the fit caches it.  Without that, a tensor that bypasses every
    stage point — a transformer's or a ResNet's residual stream — would be recomputed from the graph
    inputs by every later segment (MiniLM: segment k held ~10k nodes and a copy of the 47 MB embedding
    table), and the fit would grow with the square of the depth.  Only tensors that read no point of
    their own stage or a later one are reused: they depend on compensations of earlier stages only,
    which never change once fitted, so the cached tensor is the one recomputing it would give, bit for
    bit.  (A segment can reach a later stage's point where a subgraph reads it from the outer scope.)"""

    def __init__(self, model: onnx.ModelProto, stage_outputs: list[list[str]]):
        graph = model.graph
        self.producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
        constants = {t.name for t in graph.initializer}
        graph_inputs = {i.name for i in graph.input} - constants
        dynamic = set(graph_inputs)  # tensors that depend on a graph input (the rest are constants)
        for n in graph.node:
            if node_inputs(n) & dynamic:
                dynamic.update(o for o in n.output if o)
        available = set(graph_inputs)
        computed: dict[str, int] = {}  # dynamic tensor -> the earlier segment that computed it
        plans: list[tuple[set[int], set[str], list[str]]] = []
        for k, outputs in enumerate(stage_outputs):
            nodes, inputs = set(), set()
            stack = [o for o in outputs if o not in available]
            inputs.update(o for o in outputs if o in available)
            seen = set(stack)
            while stack:
                name = stack.pop()
                if name in computed:  # an earlier segment returns it (below) and the fit caches it
                    inputs.add(name)
                    continue
                idx = self.producer.get(name)
                if idx is None:
                    if name not in constants:
                        raise KeyError(f"tensor {name!r} has no producer")
                    continue
                nodes.add(idx)
                for i in node_inputs(graph.node[idx]):
                    if i in available:
                        inputs.add(i)
                    elif i not in seen:
                        seen.add(i)
                        stack.append(i)
            for name in inputs:
                j = computed.get(name)
                if j is not None and name not in plans[j][2]:
                    plans[j][2].append(name)
            plans.append((nodes, inputs, list(outputs)))
            available.update(outputs)
            # reusable: what does not read a point of this stage or a later one (through a subgraph's
            # outer-scope read a segment can reach a later stage's point, whose compensation is not fitted yet)
            tainted = {t for later in stage_outputs[k:] for t in later}
            for idx in sorted(nodes):
                node = graph.node[idx]
                if node_inputs(node) & tainted:
                    tainted.update(o for o in node.output if o)
                    continue
                computed.update((o, k) for o in node.output if o in dynamic and o not in available)
        self.segments = [Segment(tuple(sorted(nodes)), tuple(sorted(inputs)), tuple(outputs))
                         for nodes, inputs, outputs in plans]
        self.own_outputs = [len(outputs) for outputs in stage_outputs]  # the stage's points come first
        last: dict[str, int] = {}
        for k, seg in enumerate(self.segments):
            for name in seg.inputs:
                last[name] = k
        self.last_use = last  # cached tensor -> index of the last segment that reads it

    def extract(self, model: onnx.ModelProto, k: int, input_types: dict[str, np.dtype]) -> onnx.ModelProto:
        """Segment ``k`` of ``model`` (current initializer values) as a standalone model."""
        seg = self.segments[k]
        src = model.graph
        nodes = [src.node[i] for i in seg.nodes]
        used = set().union(*(node_inputs(n) for n in nodes)) if nodes else set()
        inits = [t for t in src.initializer if t.name in used]
        inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.dtype(input_types[n])), None)
                  for n in seg.inputs]
        own = self.own_outputs[k]  # the stage's points are float; the extra outputs keep their own types
        outputs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in seg.outputs[:own]]
        outputs += [onnx.ValueInfoProto(name=n) for n in seg.outputs[own:]]
        graph = helper.make_graph(nodes, f"segment_{k}", inputs, outputs, initializer=inits)
        out = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
        out.functions.extend(model.functions)
        return out


class TensorCache:
    """Tensors per (batch, name): in memory up to ``memory_budget`` bytes, then in a temporary directory
    that ``close()`` removes."""

    def __init__(self, memory_budget: int = 64 * 2**20) -> None:
        self.root = private_tempdir("qwt2_segments_")
        self._ids: dict[str, int] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self.budget = memory_budget
        self._memory: dict[tuple[int, str], np.ndarray] = {}
        self._memory_bytes = 0

    def _path(self, batch: int, name: str) -> Path:
        idx = self._ids.setdefault(name, len(self._ids))
        return self.root / f"{batch}_{idx}.npy"

    def put(self, batch: int, name: str, value: np.ndarray) -> None:
        self.dtypes[name] = value.dtype
        if self._memory_bytes + value.nbytes <= self.budget:
            self._memory[(batch, name)] = value
            self._memory_bytes += value.nbytes
        else:
            np.save(self._path(batch, name), value, allow_pickle=False)

    def get(self, batch: int, name: str) -> np.ndarray:
        value = self._memory.get((batch, name))
        return value if value is not None else np.load(self._path(batch, name), allow_pickle=False)

    def drop(self, name: str, batches) -> None:
        """Forget ``name`` for ``batches`` (a count: 0 .. n-1, or the batch indices)."""
        for b in (range(batches) if isinstance(batches, int) else batches):
            value = self._memory.pop((b, name), None)
            if value is not None:
                self._memory_bytes -= value.nbytes
            else:
                self._path(b, name).unlink(missing_ok=True)

    def close(self) -> None:
        self._memory.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "TensorCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
