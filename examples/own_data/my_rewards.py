"""A reward function of one's own, for the README's worked example: named on the command line as
``stage.rewards.great.function=examples.own_data.my_rewards:says_great`` (imported from the working directory).

A reward function takes the prompts and the completions (lists of strings, one per sampled reply) and returns one
float per completion.
"""


def says_great(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 for a reply that uses the word "great", else 0.0."""
    return [1.0 if "great" in completion.split() else 0.0 for completion in completions]
