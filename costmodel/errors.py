"""The cost model's own errors (it imports nothing from ``kdn``; KDN's placement maps them to ``ConfigError``).

::

    CostModelError
    ├── CatalogError     a catalog file or override that does not parse or validate
    └── InvalidInput     a workload, shape or rate that makes no sense (also a ValueError)
"""

from __future__ import annotations

__all__ = ["CostModelError", "CatalogError", "InvalidInput"]


class CostModelError(Exception):
    """Base of every error the cost model raises on purpose."""


class CatalogError(CostModelError):
    """The price/throughput catalog (file or ``SECTION.NAME.FIELD=VALUE`` override) is invalid."""


class InvalidInput(CostModelError, ValueError):
    """A workload, model shape or rate that the model cannot price."""
