"""Errors a user can act on: each names the file, field or id at fault."""


class InputFileError(ValueError):
    """A file the user named (a recipe, a data file or mix, a model folder) cannot be used as it
    is: the message names it, at ``FILE:LINE`` where it has lines, and what to do."""


class CardError(ValueError):
    """A model card is wrong: the message names the file, the line and the field."""


class UnknownModelError(KeyError):
    """A model id that no card registers; the message lists the closest ids."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class CapabilityError(RuntimeError):
    """A card marks the requested capability unsupported for this family."""
