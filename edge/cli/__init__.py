"""The `edge` command line: the one place that catches Edge errors."""
