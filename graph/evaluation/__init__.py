"""GSM8K evaluation: protocols and arms (config), problems, arms, results, learning counts, statistics, report."""
