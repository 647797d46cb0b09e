"""Helpers behind :mod:`cardtune.datasets` (the public module): file formats, media, validation,
and batching. Import from :mod:`cardtune.datasets`; these modules are split by job."""
