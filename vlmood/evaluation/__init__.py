"""Evaluation: benchmarks over many detectors with one image pass, reports, plots, standard suites.

Figures live in :mod:`vlmood.evaluation.plots` (imported on first use: it loads matplotlib)."""
from .benchmark import Benchmark, describe_detector, map_labels
from .report import Report
from .suites import list_suites, load_suite

__all__ = ["Benchmark", "Report", "describe_detector", "list_suites", "load_suite", "map_labels"]
