"""Error types for mistakes a user can fix.

Everything the library raises on purpose derives from `DreamBoothError`. The CLI and the notebook
catch it and show its message alone: what is wrong, where, and what to do. Anything else that
escapes is a bug in this library and keeps its traceback.
"""


class DreamBoothError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""


class ConfigError(DreamBoothError):
    """An option value, or a combination of options, that cannot work."""


class ImageDataError(DreamBoothError):
    """Instance or class images that cannot be used."""


class ModelLoadError(DreamBoothError):
    """A base model or trained output that cannot be found or read."""


class TrainingError(DreamBoothError):
    """Training stopped for a reason the user can act on (out of memory, NaN loss, full disk)."""


class GenerationError(DreamBoothError):
    """Image generation failed for a reason the user can act on (out of GPU memory)."""


class HubError(DreamBoothError):
    """Publishing failed for a reason the user can act on (login, permissions, repository name)."""


class RepoExistsError(HubError):
    """The Hub repository exists already, and writing into it was not allowed: nothing was uploaded."""
