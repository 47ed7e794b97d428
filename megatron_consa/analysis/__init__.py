"""Allocation statistics and heatmaps."""
