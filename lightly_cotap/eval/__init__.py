"""lightly_cotap.eval package."""
