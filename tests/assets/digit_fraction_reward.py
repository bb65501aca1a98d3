"""A reward that varies between samples of an untrained tiny model and is never zero.

verl's gsm8k reward is 0 for every sample of a random model, so GRPO would see no
signal; this one scores ``(1 + digits) / (1 + characters)``, so responses of
different make-up score differently (the policy gradient is non-zero from the first
step), and every response, even an empty or digit-free one, scores above zero (a
test that checks how the task reward is mixed into OPD's reward never sees a batch
whose task reward is all zeros and so proves nothing).
"""


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):  # noqa: ANN001 - verl's API
    return (1 + sum(ch.isdigit() for ch in solution_str)) / (1 + len(solution_str))
