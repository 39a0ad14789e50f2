"""The graph IR: nodes, types, the op vocabulary, the verifier and the printers."""

from moec.ir.graph import Graph, Namespace, Node, Origin, Ref, TensorType
from moec.ir.ops import OPS, ShapeError
from moec.ir.printer import print_graph, to_dot
from moec.ir.verify import VerifyError, verify

__all__ = ["OPS", "Graph", "Namespace", "Node", "Origin", "Ref", "ShapeError", "TensorType", "VerifyError", "print_graph", "to_dot", "verify"]
