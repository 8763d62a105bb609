"""Errors a user can cause. The CLI prints their message as one line and exits non-zero."""


class FmforgeError(Exception):
    """Base class: the message says what is wrong and what to do about it."""


class ConfigError(FmforgeError):
    """Unknown config key, unknown preset, a value of the wrong type or out of range."""


class DataError(FmforgeError):
    """No input files, an empty corpus, malformed records."""


class CheckpointError(FmforgeError):
    """Missing, incomplete or corrupt checkpoint; a checkpoint that does not fit the request."""


class SettingsMismatchError(CheckpointError):
    """A checkpoint or adapter made with other settings than the request's: another model config, base, task,
    method, head pooling or set of LoRA modules. Nothing is wrong with its files; they answer another question."""


class TokenizerError(FmforgeError):
    """Missing tokenizer files or a tokenizer that does not match the model."""


class GenerationError(FmforgeError):
    """Bad generation request, e.g. a prompt longer than the context window."""


class TrainingError(FmforgeError):
    """Training diverged (non-finite loss) or cannot continue."""


class ServingError(FmforgeError):
    """The server cannot go on serving (its engine stopped)."""
