"""The review app of racs_web (runs, crossmatches, vetting)."""
