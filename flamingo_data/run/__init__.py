"""Units and their markers, the resume-settings guard, executors, process pools, outcome."""
