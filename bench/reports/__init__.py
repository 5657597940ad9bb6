"""Reports of runs: the summary (`report`), regressions (`compare`), the robustness table,
the papers' tables beside the published figures (`reproduce`), and table formatting."""
