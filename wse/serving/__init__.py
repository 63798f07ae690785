"""Request-level serving simulation (`wse serve`, docs/serving.md)."""
