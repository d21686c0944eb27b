"""Viewers and exporters: they read results.tsv and runs/, and never change a score."""
