"""Benchmarks: methods x metrics x models x datasets, stored, summarised and reported."""

from pellucid.bench.config import BenchConfig, load_config, parse_config
from pellucid.bench.runner import run_bench

__all__ = ["BenchConfig", "load_config", "parse_config", "run_bench"]
