"""Evaluation: benchmarks over many detectors with one image pass, reports, plots, standard suites."""
from .benchmark import Benchmark, map_labels
from .report import Report
from .suites import list_suites, load_suite

__all__ = ["Benchmark", "Report", "list_suites", "load_suite", "map_labels"]
