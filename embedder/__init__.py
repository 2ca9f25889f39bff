"""embedder: turns items into Matryoshka vectors, serves them, ingests data, and hosts the CLI.

May use ``retrieval`` and ``labeling``; neither of those imports it.
"""
