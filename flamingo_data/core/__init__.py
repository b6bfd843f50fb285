"""Records, schema checks, stats, the registry of reason codes and of optional extras."""
