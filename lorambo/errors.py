class LoramboError(Exception):
    """A user error: printed as one line naming the fix, no traceback, non-zero exit."""
