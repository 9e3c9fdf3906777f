"""What every facesearch package shares: the error family, logging and CLI glue.

This package sits at the bottom of the import ladder
(facesearch -> data, embedder -> indexer -> search -> training) and imports
none of the others.
"""
