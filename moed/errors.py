"""The exceptions moed raises. Each names the file, tensor, field or setting at fault."""


class MoedError(Exception):
    """Base of every moed error."""

    def __reduce__(self):
        # crosses process boundaries (the engine process) with its fields (field, path)
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls, args, fields):
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(fields)
    return err


class CheckpointError(MoedError):
    """A checkpoint directory is missing, truncated or inconsistent.

    `path` is the file and `tensor` the tensor name at fault, when known.
    """

    def __init__(self, message, path=None, tensor=None):
        super().__init__(message)
        self.path = path
        self.tensor = tensor


class UnsupportedArchitectureError(CheckpointError):
    """config.json names an architecture moed does not implement."""


class ConfigError(MoedError):
    """A model config or daemon setting is invalid; `field` names it."""

    def __init__(self, message, field=None):
        super().__init__(message)
        self.field = field


class InvalidRequestError(MoedError):
    """A request is invalid (bad token id, too long, bad sampling field)."""

    def __init__(self, message, field=None):
        super().__init__(message)
        self.field = field


class CapacityError(MoedError):
    """The KV cache or the waiting queue cannot take the request now."""


class WorkerLostError(MoedError):
    """A worker process died while it held the request (the daemon restarts it)."""
