"""Built-in backends. Importing this registers them; it loads no model."""

from embedder.backends import dlib_backends, trained  # noqa: F401
