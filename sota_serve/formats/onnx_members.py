"""How an ensemble's combined ONNX graph names its members' nodes: written when the members
are combined (:mod:`sota_serve.formats.onnx`), read when the graph is quantized
(:mod:`sota_serve.formats.onnx_int8`)."""

from __future__ import annotations

import re


def member_prefix(i: int) -> str:
    """The name prefix of member ``i``'s nodes in an ensemble's combined graph."""
    return f"member{i}/"


_MEMBER = re.compile(r"member\d+/")


def member_of(node_name: str) -> str:
    """The member prefix of a combined graph's node name; "" outside an ensemble's members."""
    found = _MEMBER.match(node_name)
    return found.group(0) if found else ""
