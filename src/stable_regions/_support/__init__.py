"""Internal helpers shared by the studies and the command line: input checks, files written
whole, memory handed back, error scores. Not part of the public API."""
