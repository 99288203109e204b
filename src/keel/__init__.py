"""keel keeps neural-network training stable: watch, detect, recover, prevent, measure, report."""

__version__ = "0.1.0"
