class FeaturepipeError(Exception):
    """A problem the user can fix: the CLI prints it as one line and exits with code 2.

    The message names the file or option at fault and what to do about it.
    """
