"""lightly_cotap.transforms package."""
