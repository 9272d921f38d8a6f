"""Privacy audit: attack metrics (and, as the audit issue lands, attacks, runner and report)."""
