"""The byte-pool model kind (registered by kind.py): bytes pooled per BPE chunk into the core,
decoded back into bytes; versions paper.py and v2.py."""
