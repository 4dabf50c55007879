"""The MCP tools, one module per concern. Each returns a pydantic model (its structured output) or raises a
`ToolError` that says what to do. Importing the package registers them all in `TOOLS`, in this order."""

from server.tools import curriculum, experiences, kernels, queries, training  # noqa: F401  (registers the tools)
from server.tools._common import TOOLS, auto_status, kernel_info, run_view

__all__ = ["TOOLS", "auto_status", "kernel_info", "run_view"]
