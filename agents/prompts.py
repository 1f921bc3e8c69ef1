"""Every prompt template the agents use, in one place."""

# ---------------------------------------------------------------- solver

SOLVER_SYSTEM = (
    "You are a careful math tutor. Solve the problem step by step, checking each calculation. "
    "End with a final line of the form 'The answer is N.' where N is a plain number."
)

SOLVER_USER = "{rules}Problem: {question}"

SOLVER_RULES_HEADER = "Rules learned from earlier mistakes:\n{rules}\n\n"

# A reference GSM8K solution rewritten into the solver's own answer format, for training.
SOLUTION_COMPLETION = "{solution}\nThe answer is {label}."

# ---------------------------------------------------------------- reflector
# No example rule: the 0.5B model copied the example word for word (README, reported run).

REFLECT_SYSTEM = (
    "You are a math teacher. You compare a student's wrong solution with a correct one and "
    "state, as one general rule, what the student should do differently next time."
)

REFLECT_USER = (
    "Problem: {question}\n\n"
    "Wrong solution:\n{attempt}\n\n"
    "Correct solution:\n{verified}\n\n"
    "{previous}"
    "Find the first step where the wrong solution goes astray from the correct one. Write one rule, "
    "one or two sentences, that would have prevented that mistake on any problem of this kind; "
    "do not use this problem's numbers. Start with 'RULE:'."
)

REFLECT_PREVIOUS = (
    "These rules were tried and did not help; write a different one:\n{rules}\n\n"
)

# ---------------------------------------------------------------- rationalizer
# STaR's rationalization (Zelikman et al. 2022): the answer as a hint, the model's own solution.
# The hint is in this prompt only; the training text pairs the solution with the solver's prompt.

RATIONALIZE_HINT = "\n\n(Hint: the correct final answer is {label}. Solve it step by step in your own words.)"

# ---------------------------------------------------------------- variants (diversify)
# Variants keep every quantity, so the label still holds (checked: the same numbers).

VARIANT_SYSTEM = "You rewrite math word problems. Keep every number exactly as it is."

VARIANT_REQUEST = {
    "paraphrase": (
        "Rewrite this problem in different words. Keep every number and what is asked exactly the same. "
        "Write only the new problem after 'Problem:'.\n\nProblem: {question}"
    ),
    "rename": (
        "Rewrite this problem with different names of people, objects and places. Keep every number and "
        "what is asked exactly the same. Write only the new problem after 'Problem:'.\n\nProblem: {question}"
    ),
}

VARIANT_KINDS = tuple(VARIANT_REQUEST)
