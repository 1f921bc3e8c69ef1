"""Self-improvement loop: solve, verify, reflect, diversify, update, re-evaluate."""
