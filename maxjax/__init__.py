"""maxjax: a JAX/XLA compiled model runtime implementing the MAX inference interfaces."""

__version__ = "0.1.0"
