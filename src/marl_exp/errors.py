"""The error every input check raises: the ground floor, so that config, data and model code all can."""


class ConfigError(ValueError):
    """A bad config value or input. The message is one line naming the key, the value and the fix."""
