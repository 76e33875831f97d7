"""Stable Diffusion architectures as data: block layouts, MBW strings, detection."""

from optimizer.architectures.detect import ArchitectureError, check_compatible, detect_architecture
from optimizer.architectures.layout import BlockLayout, KeyAssignment, LayoutError, available_layouts, load_layout, parse_layout
from optimizer.architectures.mbw import MBWError, format_mbw, parse_mbw

__all__ = [
    "ArchitectureError", "BlockLayout", "KeyAssignment", "LayoutError", "MBWError", "available_layouts",
    "check_compatible", "detect_architecture", "format_mbw", "load_layout", "parse_layout", "parse_mbw",
]
