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

REFLECT_SYSTEM = (
    "You are a math teacher. A student solved a word problem wrongly. Find the step where the "
    "reasoning went wrong, and state the lesson as one general rule for problems of the same kind."
)

REFLECT_USER = (
    "Problem: {question}\n\n"
    "Student's wrong solution:\n{attempt}\n\n"
    "{reference}{previous}"
    "Write one rule of one or two sentences that names the kind of step that went wrong and how to "
    "do it correctly, without this problem's specific numbers. Start with 'RULE:'.\n"
    "The form, for a different mistake: {example}"
)

# Shown as the form of a rule; a rule that merely repeats it (or the instructions) is refused.
REFLECT_EXAMPLE = "RULE: When a price is given per item, multiply it by the number of items before adding other costs."

REFLECT_REFERENCE = "A correct reference solution:\n{solution}\n\n"

REFLECT_PREVIOUS = (
    "An earlier rule did not fix the mistake; write a different, better rule.\n"
    "Earlier rule: {rule}\n\n"
)

REFLECT_RETRY = (
    "Your rule was rejected because {reason}. Write one general rule in one or two sentences, "
    "starting with 'RULE:', without any number from the problem's answer."
)

# ---------------------------------------------------------------- diversifier
# Each shape asks the model for one training text that teaches the rule in a different form.
# The (prompt, completion) pair the adapters train on is (DIVERSIFY_TRAIN_PROMPT[shape], text).

DIVERSIFY_SYSTEM = "You write short study material for math word problems. Be concrete and correct."

DIVERSIFY_REQUEST = {
    "principle": (
        "Rule: {rule}\n\n"
        "Explain this rule in three or four sentences: what it says, why it matters, and when it applies."
    ),
    "worked_example": (
        "Rule: {rule}\n\n"
        "Write a NEW short math word problem where this rule matters, then solve it step by step, "
        "pointing out where the rule is used. Start with 'Problem:' and end with 'The answer is N.'"
    ),
    "checklist": (
        "Rule: {rule}\n\n"
        "Turn this rule into a checklist of three to five short items to go through before giving "
        "the final answer to a word problem."
    ),
    "contrast": (
        "Rule: {rule}\n\n"
        "Show one correct solution step that follows the rule and one typical wrong step that breaks "
        "it (a wrong number, a wrong unit, or a misread question), and say which is which and why."
    ),
}

DIVERSIFY_TRAIN_PROMPT = {
    "principle": "What rule helps avoid mistakes in math word problems like this: {rule_topic}",
    "worked_example": "Solve a word problem step by step, applying this rule: {rule_topic}",
    "checklist": "What should you check before answering a word problem? Keep in mind: {rule_topic}",
    "contrast": "Which solution step is right and which is wrong, given the rule: {rule_topic}",
}

DIVERSIFY_SHAPES = tuple(DIVERSIFY_REQUEST)
