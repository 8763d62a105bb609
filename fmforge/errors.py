"""Errors a user can cause. The CLI prints their message as one line and exits non-zero."""

import signal


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


class TrainingStopped(FmforgeError):
    """Training was asked to stop by SIGINT or SIGTERM before its last step and saved a checkpoint first. The CLI
    exits 128 + the signal's number (130, 143), as a process killed by it would, so that `fmforge pretrain && ...`
    and the quickstart do not go on with a half-trained model; the same command with --resume continues."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        saved = f"checkpoint saved: {checkpoint}" if checkpoint is not None else "no checkpoint was saved"
        super().__init__(f"stopped by {name} at step {step} ({saved}); run the same command with --resume to "
                         "continue")


class ServingError(FmforgeError):
    """The server cannot go on serving (its engine stopped)."""
