"""A reward that varies between samples of an untrained tiny model: the fraction of digits.

verl's gsm8k reward is 0 for every sample of a random model, so GRPO would see no
signal; this one gives every response a different score, so the policy gradient is
non-zero from the first step.
"""


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):  # noqa: ANN001 - verl's API
    if not solution_str:
        return 0.0
    return sum(ch.isdigit() for ch in solution_str) / len(solution_str)
