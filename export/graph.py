"""Lookups over an ONNX graph, shared by the rewrites in `export` (attention fusion, activation smoothing, the
residual-sum rewrite)."""

from dataclasses import dataclass
from typing import Any

__all__ = ["GraphIndex", "index_graph"]


@dataclass
class GraphIndex:
    initializers: dict[str, Any]  # name -> TensorProto
    producer: dict[str, Any]  # value name -> the node that writes it
    readers: dict[str, list]  # value name -> the nodes that read it, in graph order
    outputs: set[str]  # the graph's output names


def index_graph(graph) -> GraphIndex:
    """Index `graph` (an `onnx.GraphProto`) as it is now; edits to the graph afterwards are not reflected."""
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return GraphIndex(initializers={t.name: t for t in graph.initializer},
                      producer={name: node for node in graph.node for name in node.output},
                      readers=readers, outputs={o.name for o in graph.output})
