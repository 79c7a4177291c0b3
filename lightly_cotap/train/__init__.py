"""lightly_cotap.train package."""
