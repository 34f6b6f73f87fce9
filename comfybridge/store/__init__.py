"""The stores: the job journal, uploads, results, the counter file, the data folder's lock, and the
file and media helpers they share. What the core keeps lives here; nothing here knows of HTTP."""

__all__: list[str] = []
