class FeaturepipeError(Exception):
    """A problem the user can fix: the CLI prints it as one line and exits with code 2.

    The message names the file or option at fault and what to do about it.
    """


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception as it fits in a one-line message: its type and the line of its text that says most
    (torch's unpickling errors put the offending global on a later line)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    telling = next((ln for ln in lines if "Unsupported global" in ln), lines[0] if lines else "")
    return f"{type(e).__name__}: {telling[:limit]}" if telling else type(e).__name__
