"""lightly_cotap.models package."""
