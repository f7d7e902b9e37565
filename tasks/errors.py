"""Errors that a stage reports to the user as one clear message instead of a traceback."""


class StageError(Exception):
    """A failure caused by input, configuration or the environment.

    The message names the offending value and says how to fix it. The command line
    prints it without a traceback and exits with status 2.
    """


class ConfigError(StageError):
    """An invalid stage option or configuration file."""


def one_line_reason(error: BaseException, limit: int = 200) -> str:
    """Return the message of a library exception on one line, for a StageError message.

    torch.load(weights_only=True) wraps its reason in a paragraph about the PyTorch 2.6
    default, so only the reason after "WeightsUnpickler error:" is kept from that one.
    """
    text = " ".join(str(error).split())
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split(" Check the documentation", 1)[0].strip()
    if not text:
        text = ("the file ended early, so it is empty or truncated"
                if isinstance(error, EOFError) else type(error).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."
