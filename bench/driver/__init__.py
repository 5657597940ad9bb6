"""The sweep driver: configs and their cells, the sweep's units and claims, the run's files
(results, perturbations), reading a run (`runs`), and scale (processes, Ray, the compile
cache)."""
