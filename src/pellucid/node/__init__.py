"""``pellucid node``: a DICOM node that PACS and modalities route studies to (C-STORE in, a
durable spool, explanations by routing rules, results out by C-STORE or STOW-RS with retries)."""

from pellucid.node.routing import Destination, NodeConfig, Route, load_node_config
from pellucid.node.server import Node

__all__ = ["Destination", "Node", "NodeConfig", "Route", "load_node_config"]
