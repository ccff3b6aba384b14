"""Definitions of the ``arc.*`` ops that fusion passes create: one module per family, each
registering a reference implementation (torch ops) with ``arcompile.ir.ops.register``.

Importing this package registers them all; the reference interpreter imports it.
"""

from arcompile.ir.opdefs import (  # noqa: F401
    attention,
    kv_cache,
    mlp,
    norms,
    qlinear,
    quant,
    rope,
    skip,
)
