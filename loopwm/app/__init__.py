"""The application layer: what the commands do, as functions on top of the library."""
