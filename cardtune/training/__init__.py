"""Training, split by job: ``arguments`` (what a run is asked), ``model`` (loading and what is
trained), ``data`` (validated samples, lengths, packing), ``trainer`` (the Trainer, callbacks,
resume) and ``output`` (reading a trained folder back). The entry point is :mod:`cardtune.train`."""
