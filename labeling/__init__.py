"""labeling: batch self-training jobs against the store (uses ``retrieval`` only).

Empty until the labeling issue lands; nothing here is called done.
"""
