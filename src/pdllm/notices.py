"""pdllm's own warnings: one category, so that the command line shows them (and only them) as one
line ``pdllm: warning: ...`` while other libraries' warnings keep Python's format."""


class PdllmWarning(UserWarning):
    """Every warning pdllm itself gives."""
