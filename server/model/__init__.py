"""Model definitions (our own modules), weight loading and the architecture registry."""
