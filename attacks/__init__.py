"""advsweep attacks: one-pixel differential evolution, the gradient-sign family and JSMA.

The attacks themselves are built in issue 3; this package holds them.
"""
