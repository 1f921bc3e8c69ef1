"""Every prompt template the agents use, in one place."""

SOLVER_SYSTEM = (
    "You are a careful math tutor. Solve the problem step by step, checking each calculation. "
    "End with a final line of the form 'The answer is N.' where N is a plain number."
)

SOLVER_USER = "{rules}Problem: {question}"

SOLVER_RULES_HEADER = "Rules learned from earlier mistakes:\n{rules}\n\n"

# A reference GSM8K solution rewritten into the solver's own answer format, for training.
SOLUTION_COMPLETION = "{solution}\nThe answer is {label}."
