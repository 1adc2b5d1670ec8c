"""Performance benchmarks of the workbook (issue 8): ``python -m bench [part ...] [--quick]``.

Each figure is a ratio or a cost measured side by side in one process on this machine,
with the minimum, median and maximum over repeats. See ``bench/__main__.py`` for the
command line and each part's module for exactly what is timed.
"""
