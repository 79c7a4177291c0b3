"""lightly_cotap.models.modules package."""
