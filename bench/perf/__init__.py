"""advsweep's benchmarks of itself, apart from the driver users call: `advsweep perf
throughput|peers|scaling` (attack throughput against the model's limit, ours beside ART and
Foolbox, how cost grows), the users' models they run on (`user_models`, `user_cnn`), the
accelerator check, cold and warm starts, and the reference AutoAttack the standard evaluation
is held against (`reference_autoattack`, `standard_vs_reference`). Nothing in the driver
imports this package."""
