"""Device backends: the interface, the built-in implementations and the plugin registry."""

from moeport.backends.base import Backend, Capabilities

__all__ = ["Backend", "Capabilities"]
