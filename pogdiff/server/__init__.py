"""Serving many visitors: input checks and quotas."""
