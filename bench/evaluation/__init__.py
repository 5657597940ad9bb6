"""The standard evaluation: AutoAttack's protocol in JAX (`standard`), and the zoo under it
kept as files (`standard_runs`)."""
