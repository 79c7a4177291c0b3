"""lightly_cotap.data package."""
