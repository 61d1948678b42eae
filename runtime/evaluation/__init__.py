"""Offline evaluation, the promotion gate and their HTML reports."""
