"""Detection methods as plug-ins: one module per method, each registering itself by name.

    from ccad.methods import Method, register_method, get_method, method_names

The CLI, the app and ``AnomalyDetector.from_pretrained`` read this registry (see
:mod:`ccad.methods.base` for what a method owns).
"""
from .base import (
    Context,
    Method,
    MethodOutput,
    UnknownVariant,
    describe_methods,
    get_method,
    method_names,
    register_method,
    unregister_method,
)

__all__ = [
    "Context", "Method", "MethodOutput", "UnknownVariant", "describe_methods",
    "get_method", "method_names", "register_method", "unregister_method",
]
