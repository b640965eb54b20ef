"""Performance records (`bench`) and their comparison with loss alignment (`compare`)."""
