"""Figures of the brief, measured as ratios against baselines taken in the same run."""
