"""advsweep benchmark driver and the `advsweep` command line."""
