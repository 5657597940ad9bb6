"""Per-image checks beside every attack: gradient masking (`masking`), detection
(`detection`), and AutoAttack's checks and the report's flags (`validity`, explained in
docs/flags.md)."""
